"""Tensor-parallel correctness and scaling of the engine core on several GPUs (NCCL).

    python benchmarks/tp_bench.py --sizes 1,2 --model .models/mini-llada-v1 \
        --tasks .models/dev.jsonl --out "$OUT"

For each tensor-parallel size (one process per GPU):
  A. mini model, float32 (TF32 off): tokens of `none` and `elastic` on the dev prompts;
  B. LLaDA-8B shape, random bf16 weights (the same model at every size): logits of a fixed
     sequence, compared with size 1 by relative error;
  C. LLaDA-8B shape: per-step time and tokens/s of `none` and `elastic` at several batch
     sizes, G = 512 (random weights commit one token per step: cost per step);
  D. NCCL all-reduce time for the step's activation sizes, and the all-reduce time per step
     it implies (2 per layer).
Prints a table last; full numbers in OUT/tp_bench.json.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

for _k, _v in (("NCCL_NVLS_ENABLE", "0"), ("TORCH_SYMM_MEM_DISABLE_MULTICAST", "1"),
               ("NVSHMEM_DISABLE_NVLS", "1")):
    os.environ[_k] = _v  # NVLink multicast stays off on shared hosts


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    if dist.is_initialized():
        dist.barrier()


def part_a(args, tp, device) -> dict:
    from model_executor.tokenizer import load_tokenizer, render_prompt
    from vllm_elastic.core import Engine, GenerationParams

    tok = load_tokenizer(args.model)
    items = [json.loads(l) for l in open(args.tasks)][:args.prompts]
    prompts = [render_prompt(tok, {"messages": it["messages"]}) for it in items]
    engine = Engine.from_pretrained(args.model, dtype=torch.float32, device=device, tp=tp,
                                    max_batch_size=len(prompts), max_request_tokens=512)
    out = {}
    for policy in ("none", "elastic"):
        params = GenerationParams.from_dict({"policy": policy, "gen_length": 256,
                                             "block_length": 32, "threshold": 0.9})
        out[policy] = [r.token_ids for r in engine.generate(prompts, params)]
    del engine
    return out


def part_b(model, device) -> list[list[float]]:
    g = torch.Generator(device=device).manual_seed(7)
    ids = torch.randint(0, model.cfg.vocab_size, (512,), generator=g, device=device)
    with torch.inference_mode():
        logits = model.forward(ids)
    return logits[::16].float().cpu().tolist()


def part_c(model, device, batches, gen_length, steps) -> list[dict]:
    from model_executor.tokenizer import SpecialIds
    from vllm_elastic.core import Engine, GenerationParams

    special = SpecialIds(mask=126336, eos=126081, eot=126348, bos=126080)
    rows = []
    for policy in ("none", "elastic"):
        for bs in batches:
            engine = Engine(model, special, max_batch_size=bs, page_size=16,
                            max_request_tokens=128 + gen_length)
            g = torch.Generator().manual_seed(bs)
            params = GenerationParams.from_dict({"policy": policy, "gen_length": gen_length,
                                                 "block_length": 32, "threshold": 0.9})
            for _ in range(bs):
                engine.add_request(torch.randint(0, 126000, (128,), generator=g).tolist(),
                                   params)
            for _ in range(2):  # the full first pass and one more, not timed
                engine.step()
            _sync()
            t0 = time.perf_counter()
            committed = 0
            for _ in range(steps):
                committed += sum(len(o.committed) for o in engine.step())
            _sync()
            dt = (time.perf_counter() - t0) / steps
            stats = [r.stats for r in engine.running]
            rows.append({"policy": policy, "batch": bs, "ms_per_step": dt * 1e3,
                         "tokens_per_s": committed / (dt * steps),
                         "drift_events": sum(s.drift_events for s in stats),
                         "peak_mem_gb": (torch.cuda.max_memory_allocated() / 2 ** 30
                                         if torch.cuda.is_available() else 0.0)})
            for r in list(engine.running):
                engine.abort(r.id)
            del engine
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
    return rows


def part_d(device, sizes_rows, d_model) -> list[dict]:
    out = []
    for rows in sizes_rows:
        x = torch.randn(rows, d_model, device=device, dtype=torch.bfloat16)
        for _ in range(5):
            dist.all_reduce(x)
        _sync()
        n = 50
        t0 = time.perf_counter()
        for _ in range(n):
            dist.all_reduce(x)
        _sync()
        dt = (time.perf_counter() - t0) / n
        nbytes = x.numel() * 2
        w = dist.get_world_size()
        out.append({"rows": rows, "bytes": nbytes, "us": dt * 1e6,
                    "bus_GBps": nbytes * 2 * (w - 1) / w / dt / 1e9})
    return out


def worker(rank: int, world: int, port: int, args, result_file: str) -> None:
    from model_executor.config import llada_8b_config
    from model_executor.llada import LLaDAModel
    from model_executor.parallel import TensorParallel

    cuda = args.device == "cuda"
    if cuda:
        torch.cuda.set_device(rank)
        device = torch.device("cuda", rank)
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
    else:  # a smoke run of the script's logic on the CPU (gloo, tiny shapes)
        device = torch.device("cpu")
        torch.set_num_threads(1)
    tp = None
    if world > 1:
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        if cuda:
            dist.init_process_group("nccl", rank=rank, world_size=world, device_id=device)
        else:
            dist.init_process_group("gloo", rank=rank, world_size=world)
        tp = TensorParallel.from_process_group()
    res: dict = {"world": world}
    t0 = time.perf_counter()
    res["mini_tokens"] = part_a(args, tp, device)
    res["t_mini_s"] = time.perf_counter() - t0
    cfg = llada_8b_config()
    if not cuda:
        cfg = replace(cfg, d_model=256, n_layers=2, n_heads=4, n_kv_heads=4,
                      mlp_hidden_size=512, vocab_size=126464, embedding_size=126464)
    model = LLaDAModel.random(cfg, dtype=torch.bfloat16 if cuda else torch.float32,
                              device=device, tp=tp)
    res["logits_8b"] = part_b(model, device)
    res["throughput"] = part_c(model, device, [int(b) for b in args.batches.split(",")],
                               args.gen_length, args.steps)
    if world > 1:
        res["allreduce"] = part_d(device, [1 + 16 + 1, 8 * 24, 32 * 24, 32 * 640],
                                  model.cfg.d_model)
    if rank == 0:
        Path(result_file).write_text(json.dumps(res))
    if world > 1:
        dist.destroy_process_group()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sizes", default="1,2")
    ap.add_argument("--model", default=".models/mini-llada-v1")
    ap.add_argument("--tasks", default=".models/dev.jsonl")
    ap.add_argument("--prompts", type=int, default=50)
    ap.add_argument("--batches", default="1,8,32")
    ap.add_argument("--gen-length", type=int, default=512)
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    ap.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    args = ap.parse_args()
    results = {}
    for w in (int(s) for s in args.sizes.split(",")):
        if args.device == "cuda" and w > torch.cuda.device_count():
            print(f"skip TP={w}: {torch.cuda.device_count()} GPUs", flush=True)
            continue
        f = os.path.join(args.out, f"tp{w}.json")
        t0 = time.perf_counter()
        mp.spawn(worker, args=(w, _port(), args, f), nprocs=w, join=True)
        results[w] = json.loads(Path(f).read_text())
        print(f"TP={w} done in {time.perf_counter() - t0:.0f} s", flush=True)
    base = results.get(1)
    card = torch.cuda.get_device_name(0) if args.device == "cuda" else "cpu"
    summary = {"card": card, "sizes": list(results)}
    lines = []
    for w, r in results.items():
        if base is None:
            break
        same = {p: sum(a == b for a, b in zip(r["mini_tokens"][p], base["mini_tokens"][p]))
                for p in ("none", "elastic")}
        l1, lw = torch.tensor(base["logits_8b"]), torch.tensor(r["logits_8b"])
        rel = ((lw - l1).norm() / l1.norm()).item()
        summary[f"tp{w}"] = {"same_tokens": same, "n": len(base["mini_tokens"]["none"]),
                             "logits_rel_err": rel, "throughput": r["throughput"],
                             "allreduce": r.get("allreduce")}
        lines.append(f"TP={w}: mini same tokens none {same['none']}/{args.prompts}, "
                     f"elastic {same['elastic']}/{args.prompts}; 8B logits rel. err {rel:.2e}")
    Path(args.out, "tp_bench.json").write_text(json.dumps(summary, indent=1))
    print("\n| TP | policy | batch | ms/step | tok/s | scaling eff. vs TP=1 | peak GB/GPU |")
    print("|---|---|---|---|---|---|---|")
    for w, r in results.items():
        for row in r["throughput"]:
            ref = next(x for x in base["throughput"]
                       if x["policy"] == row["policy"] and x["batch"] == row["batch"])
            eff = ref["ms_per_step"] / row["ms_per_step"] / w
            print(f"| {w} | {row['policy']} | {row['batch']} | {row['ms_per_step']:.1f} | "
                  f"{row['tokens_per_s']:.1f} | {eff:.2f} | {row['peak_mem_gb']:.1f} |")
    for w, r in results.items():
        for a in r.get("allreduce") or []:
            print(f"TP={w} all-reduce {a['rows']} rows ({a['bytes'] / 1e6:.2f} MB): "
                  f"{a['us']:.1f} us, bus {a['bus_GBps']:.1f} GB/s")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
