"""Every cache policy on the mini model's dev tasks: fidelity and cost (CPU or GPU, float32).

For each policy: answer and token agreement with full recompute (`none`) under the same
decoding rule (Elastic-Cache's sliding window is compared with `none` on the same window),
accuracy, rows computed per layer, compute and layer-refresh fractions, tokens per step and
CPU tokens/s; then Elastic-Cache's agreement and compute fraction over gamma.

    python benchmarks/policy_table.py --model ../shared/models/mini-llada-v1 \
        --tasks ../shared/data/mini-tasks/dev.jsonl --out benchmarks/policy_table.json

Prints a markdown table last. Tokens/s count generated tokens up to the first EOS / end of
turn (never padding) over wall time.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from model_executor.tokenizer import load_tokenizer, render_prompt  # noqa: E402
from vllm_elastic.core import Engine, GenerationParams  # noqa: E402
from vllm_elastic.evaluation import extract_answer, is_correct, normalize  # noqa: E402


def run(engine, prompts, params) -> tuple[list, float]:
    t0 = time.perf_counter()
    res = engine.generate(prompts, params)
    return res, time.perf_counter() - t0


def summarize(name, res, elapsed, items, tok, ref=None, stop=()):
    texts = [tok.decode(r.token_ids, skip_special_tokens=True) for r in res]
    n_tok = sum(sum(1 for t in r.token_ids if t not in stop) for r in res)
    row = {
        "config": name,
        "accuracy": sum(is_correct(t, it["answer"]) for t, it in zip(texts, items)) / len(items),
        "rows_per_layer": sum(r.stats["rows_per_layer"] for r in res) / len(res),
        "compute_fraction": sum(r.stats["compute_fraction"] for r in res) / len(res),
        "layer_refresh_fraction": sum(r.stats["layer_refresh_fraction"] for r in res) / len(res),
        "tokens_per_step": sum(r.stats["tokens_per_step"] for r in res) / len(res),
        "steps": sum(r.stats["steps"] for r in res) / len(res),
        "tokens_per_s": n_tok / elapsed,
        "seconds": elapsed,
    }
    if ref is not None:
        ref_res, ref_texts = ref
        row["answer_agreement"] = sum(
            normalize(extract_answer(a)) == normalize(extract_answer(b))
            for a, b in zip(texts, ref_texts)) / len(texts)
        row["sequence_agreement"] = sum(a.token_ids == b.token_ids
                                        for a, b in zip(res, ref_res)) / len(res)
        pos = [sum(x == y for x, y in zip(a.token_ids, b.token_ids))
               / max(len(a.token_ids), len(b.token_ids), 1) for a, b in zip(res, ref_res)]
        row["token_agreement"] = sum(pos) / len(pos)
    return row, texts


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="../shared/models/mini-llada-v1")
    ap.add_argument("--tasks", default="../shared/data/mini-tasks/dev.jsonl")
    ap.add_argument("--limit", type=int, default=None)
    ap.add_argument("--gen-length", type=int, default=256)
    ap.add_argument("--block-length", type=int, default=32)
    ap.add_argument("--threshold", type=float, default=0.9)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--gammas", default="0.8,0.9,0.95,0.99")
    ap.add_argument("--out", default="benchmarks/policy_table.json")
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args()

    tok = load_tokenizer(args.model)
    items = [json.loads(l) for l in open(args.tasks)]
    if args.limit is not None:  # the same number of each task kind, interleaved
        by_task: dict[str, list] = {}
        for it in items:
            by_task.setdefault(it["task"], []).append(it)
        items = [it for group in zip(*by_task.values()) for it in group][:args.limit]
    prompts = [render_prompt(tok, {"messages": it["messages"]}) for it in items]
    torch.backends.cuda.matmul.allow_tf32 = False  # float32 means float32 on a GPU too
    engine = Engine.from_pretrained(args.model, dtype=torch.float32, device=args.device,
                                    max_batch_size=args.batch_size,
                                    max_request_tokens=max(map(len, prompts)) + args.gen_length)
    stop = engine.special.stop
    base = {"gen_length": args.gen_length, "block_length": args.block_length,
            "threshold": args.threshold}
    rows = []
    refs = {}
    for rule, extra in (("block", {}), ("window16", {"window": 16})):
        res, dt = run(engine, prompts, GenerationParams.from_dict({**base, **extra,
                                                                   "policy": "none"}))
        row, texts = summarize(f"none ({rule})", res, dt, items, tok, stop=stop)
        row.update(answer_agreement=1.0, sequence_agreement=1.0, token_agreement=1.0)
        refs[rule] = (res, texts)
        rows.append(row)
        print(json.dumps(row), file=sys.stderr, flush=True)
    configs = [("prefix", {}, "block"), ("dual", {}, "block"), ("spa", {}, "block"),
               ("dkv", {}, "block")]
    configs += [(f"elastic gamma={g}", {"gamma": float(g)}, "window16")
                for g in args.gammas.split(",")]
    configs += [("elastic gamma=0.9 drift=rows", {"gamma": 0.9, "drift": "rows"}, "window16")]
    for name, extra, rule in configs:
        policy = name.split()[0]
        params = GenerationParams.from_dict({**base, **extra, "policy": policy,
                                             **({"window": 16} if rule == "window16" else {})})
        res, dt = run(engine, prompts, params)
        row, _ = summarize(f"{name} ({rule})", res, dt, items, tok, ref=refs[rule], stop=stop)
        rows.append(row)
        print(json.dumps(row), file=sys.stderr, flush=True)

    Path(args.out).write_text(json.dumps({"args": vars(args), "rows": rows}, indent=1))
    none_tps = {r["config"].split("(")[1]: r["tokens_per_s"] for r in rows
                if r["config"].startswith("none")}
    print(f"\n{len(items)} dev prompts, G={args.gen_length}, B={args.block_length}, "
          f"tau={args.threshold}, float32, {args.device}, batch {args.batch_size}\n")
    print("| config | answer agr. | seq. agr. | token agr. | accuracy | rows/layer | "
          "compute frac. | layer-refresh frac. | tokens/step | tok/s | speedup vs none |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        rule = r["config"].split("(")[1]
        print(f"| {r['config']} | {r['answer_agreement']:.3f} | {r['sequence_agreement']:.3f} | "
              f"{r['token_agreement']:.3f} | {r['accuracy']:.3f} | {r['rows_per_layer']:.1f} | "
              f"{r['compute_fraction']:.3f} | {r['layer_refresh_fraction']:.3f} | "
              f"{r['tokens_per_step']:.2f} | {r['tokens_per_s']:.1f} | "
              f"{r['tokens_per_s'] / none_tps[rule]:.2f}x |")


if __name__ == "__main__":
    main()
