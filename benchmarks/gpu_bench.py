"""GPU benchmark of the engine core: one script, one device call.

    python benchmarks/gpu_bench.py --out $OUT [--quick] [--budget-s 500]

In order (each section is skipped, and says so, once the time budget is spent):
1. kernel checks (tests/test_kernels.py: Triton kernels vs torch on random inputs);
2. the card's two ceilings: device-to-device copy bandwidth (bytes read + written) and
   the bf16 matrix-product rate (8192^3, random data);
3. LLaDA-8B shape, random bf16 weights built on the GPU: every policy at batch 1/8/32 and
   G = 256/512 (B = 32, tau = 0.9, stop at EOS off), with a capped number of timed steps
   (random weights commit ~1 token per step, so this measures cost per step): tokens/s,
   steps/s, per-step latency by step type (full pass / row pass / refresh), rows computed
   per layer, layer-refresh fraction, peak GPU memory, and for each step type the floor
   max(bytes / bandwidth, FLOPs / matmul rate) and the measured multiple of it;
   "before" rows: the plain torch path (kernels off) for none and elastic;
4. the mini model on the dev tasks (real dynamics): accuracy and tokens/s per policy with
   the kernels, and the fraction of prompts whose tokens match the plain torch path.
Full numbers go to $OUT/gpu_bench.json, a plot to $OUT/gpu_bench.png; a table is printed
last.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import torch  # noqa: E402

from model_executor.config import llada_8b_config  # noqa: E402
from model_executor.llada import LLaDAModel  # noqa: E402
from model_executor.tokenizer import SpecialIds  # noqa: E402
from vllm_elastic.core import Engine, GenerationParams  # noqa: E402
from vllm_elastic.core import step_runner as _sr  # noqa: E402
from vllm_elastic.core.attention import use_kernels  # noqa: E402
from vllm_elastic.evaluation import extract_answer, is_correct  # noqa: E402

POLICIES = ["none", "prefix", "dual", "elastic", "spa", "dkv"]
T0 = time.time()
LOG: list[str] = []


def log(*a):
    s = " ".join(str(x) for x in a)
    print(f"[{time.time() - T0:6.1f}s] {s}", flush=True)
    LOG.append(s)


# -- work accounting: every attention call is one layer's worth of GEMMs on its rows -----

class Work:
    """FLOPs and bytes of the step in progress, counted at each layer's attention call."""

    def __init__(self):
        self.reset()
        self.cfg = None

    def reset(self):
        self.flops = 0.0
        self.bytes = 0.0

    def layer(self, batch, q):
        c = self.cfg
        d, m = c.d_model, c.mlp_hidden_size
        p_layer = 4 * d * d + 3 * d * m
        rows = int(q.shape[0])
        lens = [int(s.shape[0]) for s in batch.slot_maps]
        rr = [b - a for a, b in zip(batch.row_offsets, batch.row_offsets[1:])]
        el = 2  # bf16
        self.flops += 2.0 * rows * p_layer + sum(4.0 * r * n * d for r, n in zip(rr, lens))
        self.bytes += el * (p_layer + sum(2 * n * d for n, r in zip(lens, rr) if r)
                            + rows * (2 * d + 4 * d))  # K/V write, activations in/out

    def head(self, rows):
        c = self.cfg
        self.flops += 2.0 * rows * c.d_model * c.embedding_size
        self.bytes += 2 * c.d_model * c.embedding_size


WORK = Work()
_orig_attn = _sr.paged_attention


def _counting_attention(q, batch, k, v):
    WORK.layer(batch, q)
    return _orig_attn(q, batch, k, v)


_sr.paged_attention = _counting_attention


# -- ceilings -----------------------------------------------------------------------------

def ceilings():
    dev = "cuda"
    n = 1 << 30  # 1 Gi bf16 elements = 2 GiB
    a = torch.randn(n // 1024, 1024, device=dev).to(torch.bfloat16)
    b = torch.empty_like(a)
    for _ in range(3):
        b.copy_(a)
    torch.cuda.synchronize()
    ev = [torch.cuda.Event(enable_timing=True) for _ in range(2)]
    times = []
    for _ in range(10):
        ev[0].record()
        b.copy_(a)
        ev[1].record()
        torch.cuda.synchronize()
        times.append(ev[0].elapsed_time(ev[1]) / 1e3)
    bw = 2 * a.numel() * 2 / statistics.median(times)
    del a, b
    x = torch.randn(8192, 8192, device=dev).to(torch.bfloat16)
    y = torch.randn(8192, 8192, device=dev).to(torch.bfloat16)
    for _ in range(3):
        x @ y
    torch.cuda.synchronize()
    times = []
    for _ in range(10):
        ev[0].record()
        x @ y
        ev[1].record()
        torch.cuda.synchronize()
        times.append(ev[0].elapsed_time(ev[1]) / 1e3)
    peak = 2 * 8192 ** 3 / statistics.median(times)
    del x, y
    torch.cuda.empty_cache()
    return {"copy_bw_Bps": bw, "bf16_flops": peak}


# -- kernel micro-benchmarks ---------------------------------------------------------------

def kernel_micro(cfg):
    """Paged attention at the 8B head shape: kernel vs torch (per call, ms)."""
    import triton.testing as tt

    from vllm_elastic.core.attention import RaggedBatch, paged_attention_torch
    from vllm_elastic.kernels import paged_attention_triton

    H, D = cfg.n_heads, cfg.head_dim
    out = []
    for R, rows, keys in [(1, 20, 640), (32, 20, 640), (1, 640, 640), (8, 640, 640),
                          (4, 1000, 1600)]:
        slots = R * keys
        k = torch.randn(slots, H, D, device="cuda", dtype=torch.bfloat16)
        v = torch.randn_like(k)
        maps = [torch.arange(i * keys, (i + 1) * keys, device="cuda") for i in range(R)]
        b = RaggedBatch([i * rows for i in range(R + 1)], maps)
        q = torch.randn(R * rows, H, D, device="cuda", dtype=torch.bfloat16)
        t_k = tt.do_bench(lambda: paged_attention_triton(q, b, k, v), return_mode="median")
        t_t = tt.do_bench(lambda: paged_attention_torch(q, b, k, v), return_mode="median")
        flops = 4.0 * R * rows * keys * H * D
        byts = 2 * 2 * R * keys * H * D + 2 * 2 * R * rows * H * D
        out.append({"requests": R, "rows": rows, "keys": keys, "triton_ms": t_k,
                    "torch_ms": t_t, "triton_TFLOPs": flops / t_k / 1e9,
                    "triton_GBps": byts / t_k / 1e6})
        log(f"attn R={R} rows={rows} keys={keys}: triton {t_k:.3f} ms, torch {t_t:.3f} ms")
    return out


# -- 8B random-weight runs ------------------------------------------------------------------

def special_8b():
    return SpecialIds(mask=126336, eos=126081, eot=126348, bos=126080)


def params_for(policy, G):
    d = {"policy": policy, "gen_length": G, "block_length": 32, "threshold": 0.9,
         "stop_at_eos": False}
    return GenerationParams.from_dict(d)


def classify(before, after):
    if any(a.full_steps > b.full_steps for a, b in zip(after, before)):
        return "full"
    if any(a.drift_events > b.drift_events for a, b in zip(after, before)):
        return "refresh"
    return "row"


def snap(reqs):
    import copy
    return [copy.copy(r.stats) for r in reqs]


def timed_run(engine, prompts, params, steps, ceil, L, warm=0):
    """Add the requests, run step 0 (and `warm` more steps) untimed, time the next `steps`
    steps; abort. Per-step data."""
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    reqs = [engine.add_request(p, params) for p in prompts]
    for _ in range(1 + warm):  # step 0: the first full pass (not timed)
        engine.step()
    per_step = []
    s0 = snap(reqs)
    for _ in range(steps):
        if not engine.running:
            break
        b = snap(reqs)
        WORK.reset()
        n_cand = sum(len(r.candidates()) for r in engine.running)
        torch.cuda.synchronize()
        t = time.perf_counter()
        engine.step()
        torch.cuda.synchronize()
        dt = time.perf_counter() - t
        WORK.head(n_cand)
        a = snap(reqs)
        floor_b = WORK.bytes / ceil["copy_bw_Bps"]
        floor_f = WORK.flops / ceil["bf16_flops"]
        per_step.append({"type": classify(b, a), "s": dt, "flops": WORK.flops,
                         "bytes": WORK.bytes, "floor_s": max(floor_b, floor_f),
                         "floor_kind": "bytes" if floor_b >= floor_f else "flops",
                         "tokens": sum(x.tokens_committed - y.tokens_committed
                                       for x, y in zip(a, b))})
    s1 = snap(reqs)
    for r in reqs:
        engine.abort(r.id)
    peak = torch.cuda.max_memory_allocated() / 2 ** 30
    n = len(per_step)
    total = sum(p["s"] for p in per_step)
    tokens = sum(p["tokens"] for p in per_step)
    d = lambda f: sum(f(x) - f(y) for x, y in zip(s1, s0))  # noqa: E731
    rows = d(lambda s: s.rows_computed)
    types = {}
    for kind in ("full", "row", "refresh"):
        xs = [p for p in per_step if p["type"] == kind]
        if xs:
            ms = [p["s"] * 1e3 for p in xs]
            fl = [p["floor_s"] * 1e3 for p in xs]
            types[kind] = {
                "count": len(xs), "mean_ms": statistics.mean(ms),
                "median_ms": statistics.median(ms), "floor_ms": statistics.mean(fl),
                "floor_kind": max(set(p["floor_kind"] for p in xs),
                                  key=[p["floor_kind"] for p in xs].count),
                "x_floor": statistics.mean(ms) / max(1e-9, statistics.mean(fl)),
                "TFLOPs": sum(p["flops"] for p in xs) / sum(p["s"] for p in xs) / 1e12,
                "GBps": sum(p["bytes"] for p in xs) / sum(p["s"] for p in xs) / 1e9,
            }
    return {
        "steps_timed": n, "time_s": total, "tokens": tokens,
        "tok_s": tokens / total if total else 0.0, "steps_s": n / total if total else 0.0,
        "ms_per_step": 1e3 * total / max(1, n),
        "rows_per_layer": rows / max(1, n * L * len(prompts)),
        "compute_fraction": rows / max(1, d(lambda s: s.rows_full)),
        "layer_refresh_fraction": d(lambda s: s.layers_refreshed)
        / max(1, d(lambda s: s.layers_total)),
        "peak_mem_GiB": peak, "types": types,
        "step_ms": [round(p["s"] * 1e3, 3) for p in per_step],
        "step_types": [p["type"][0] for p in per_step],
    }


def profile_8b(args, ceil):
    """torch.profiler tables of a few 8B steps (where the time goes)."""
    from torch.profiler import ProfilerActivity, profile

    cfg = llada_8b_config()
    WORK.cfg = cfg
    model = LLaDAModel.random(cfg, torch.bfloat16, "cuda")
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(0, 126000, (args.prompt_len,), generator=g).tolist()
               for _ in range(8)]
    eng = Engine(model, special_8b(), max_batch_size=8, page_size=16,
                 max_request_tokens=args.prompt_len + 256)
    for pol, batch in [("dual", 1), ("elastic", 1), ("elastic", 8)]:
        reqs = [eng.add_request(p, params_for(pol, 256)) for p in prompts[:batch]]
        for _ in range(4):
            eng.step()
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            for _ in range(4):
                eng.step()
            torch.cuda.synchronize()
        for r in reqs:
            eng.abort(r.id)
        ka = prof.key_averages()
        n_kernels = sum(e.count for e in ka if e.device_type.name == "CUDA")
        print(f"=== profile {pol} batch {batch}: {n_kernels / 4:.0f} GPU kernels/step")
        print(ka.table(sort_by="self_cpu_time_total", row_limit=22, max_name_column_width=60))
        print(ka.table(sort_by="self_cuda_time_total", row_limit=14, max_name_column_width=60))


def run_8b(args, ceil, results):
    cfg = llada_8b_config()
    WORK.cfg = cfg
    log("building LLaDA-8B-shaped random model (bf16, on the GPU)")
    model = LLaDAModel.random(cfg, torch.bfloat16, "cuda")
    torch.cuda.synchronize()
    results["kernel_micro"] = kernel_micro(cfg)
    g = torch.Generator().manual_seed(0)
    P = args.prompt_len
    prompts = [torch.randint(0, 126000, (P,), generator=g).tolist() for _ in range(32)]
    L = cfg.n_layers
    runs = results.setdefault("runs_8b", [])
    for G in args.gens:
        if time.time() - T0 > args.budget_s:
            log(f"budget spent: skipping G={G}")
            break
        eng = Engine(model, special_8b(), max_batch_size=max(args.batches), page_size=16,
                     max_request_tokens=P + G)
        # Warm-up: compile kernel variants outside the timed windows (each timed run also
        # starts with untimed steps).
        for pol in POLICIES:
            timed_run(eng, prompts[:2], params_for(pol, G), 2, ceil, L)
        for batch in args.batches:
            for pol in args.policies:
                if time.time() - T0 > args.budget_s:
                    log(f"budget spent: skipping G={G} batch={batch} {pol}")
                    continue
                steps = args.steps_none if pol == "none" else args.steps
                # Untimed: step 0 and 2 more, then timed steps 3..steps+2 (with 1 token per
                # step, the window holds one block start when steps = B = 32).
                try:
                    r = timed_run(eng, prompts[:batch], params_for(pol, G), steps, ceil, L,
                                  warm=2)
                except Exception as e:  # noqa: BLE001 - report and go on
                    log(f"FAILED 8B G={G} b={batch} {pol}: {e!r}")
                    for rq in list(eng.running) + list(eng.waiting):
                        eng.abort(rq.id)
                    continue
                r.update({"model": "8b-random", "G": G, "batch": batch, "policy": pol,
                          "path": "kernels"})
                runs.append(r)
                log(f"8B G={G} b={batch} {pol:8s} {r['tok_s']:8.1f} tok/s "
                    f"{r['ms_per_step']:8.2f} ms/step types="
                    + " ".join(f"{k}:{v['mean_ms']:.1f}ms/x{v['x_floor']:.2f}"
                               for k, v in r["types"].items()))
        # "Before": the plain torch path (the engine core as first written).
        if G == args.gens[0] and not args.no_before:
            use_kernels(False)
            for batch in (1, max(args.batches)):
                for pol in ("none", "elastic"):
                    if time.time() - T0 > args.budget_s:
                        continue
                    steps = args.steps_none if pol == "none" else min(args.steps, 16)
                    r = timed_run(eng, prompts[:batch], params_for(pol, G), steps, ceil, L,
                                  warm=1)
                    r.update({"model": "8b-random", "G": G, "batch": batch, "policy": pol,
                              "path": "torch"})
                    runs.append(r)
                    log(f"8B torch-path G={G} b={batch} {pol:8s} {r['tok_s']:8.1f} tok/s "
                        f"{r['ms_per_step']:8.2f} ms/step")
            use_kernels(True)
        del eng
        torch.cuda.empty_cache()
    del model
    torch.cuda.empty_cache()


# -- mini model ----------------------------------------------------------------------------

def run_mini(args, results):
    from model_executor.tokenizer import load_tokenizer, render_prompt

    folder = os.path.join(ROOT, ".models", "mini-llada-v1")
    items = [json.loads(line) for line in open(os.path.join(ROOT, ".models", "dev.jsonl"))]
    if args.mini_n:  # an interleaved subset: every task kind
        items = items[::max(1, len(items) // args.mini_n)][:args.mini_n]
    tok = load_tokenizer(folder)
    prompts = [render_prompt(tok, {"messages": it["messages"]}) for it in items]
    eng = Engine.from_pretrained(folder, dtype=torch.bfloat16, device="cuda",
                                 max_batch_size=args.mini_batch,
                                 max_request_tokens=max(len(p) for p in prompts) + 256)
    WORK.cfg = eng.model.cfg
    from vllm_elastic.core.params import GenerationParams as GP
    # Logic check: in float32 the kernel path must give the torch path's tokens.
    fp32 = results.setdefault("mini_fp32_parity", {})
    if not args.no_fp32_parity:
        eng32 = Engine.from_pretrained(folder, dtype=torch.float32, device="cuda",
                                       max_batch_size=args.mini_batch,
                                       max_request_tokens=max(len(p) for p in prompts) + 256)
        torch.backends.cuda.matmul.allow_tf32 = False
        sub = prompts[:48]
        for pol in POLICIES:
            gp = GP.from_dict({"policy": pol, "gen_length": 128, "block_length": 32})
            use_kernels(False)
            a = eng32.generate(sub, gp)
            use_kernels(True)
            b = eng32.generate(sub, gp)
            fp32[pol] = sum(x.token_ids == y.token_ids for x, y in zip(a, b)) / len(sub)
            log(f"mini fp32 parity {pol}: {fp32[pol]:.3f}")
        del eng32
    out = results.setdefault("mini", [])
    base_answers: list = []
    # warm-up (compile)
    for pol in POLICIES:
        eng.generate(prompts[:4], GP.from_dict({"policy": pol, "gen_length": 64}))
    for pol in POLICIES:
        if time.time() - T0 > args.budget_s:
            log(f"budget spent: skipping mini {pol}")
            continue
        gp = GP.from_dict({"policy": pol, "gen_length": 256, "block_length": 32,
                           "threshold": 0.9})
        row = {"policy": pol, "n": len(prompts), "G": 256, "batch": args.mini_batch}
        for path in ("kernels", "torch"):
            use_kernels(path == "kernels")
            torch.cuda.synchronize()
            t = time.perf_counter()
            res = eng.generate(prompts, gp)
            torch.cuda.synchronize()
            dt = time.perf_counter() - t
            toks = sum(len(r.token_ids) for r in res)
            texts = [tok.decode(r.token_ids, skip_special_tokens=True) for r in res]
            acc = sum(is_correct(tx, it["answer"]) for tx, it in zip(texts, items)) / len(items)
            steps = sum(r.stats["steps"] for r in res) / len(res)
            lrf = statistics.mean(r.stats["layer_refresh_fraction"] for r in res)
            cf = statistics.mean(r.stats["compute_fraction"] for r in res)
            row[path] = {"tok_s": toks / dt, "time_s": dt, "accuracy": acc,
                         "steps_per_request": steps, "layer_refresh_fraction": lrf,
                         "compute_fraction": cf, "tokens": toks}
            row[path + "_ids"] = [r.token_ids for r in res]
        same = sum(a == b for a, b in zip(row["kernels_ids"], row["torch_ids"]))
        row["same_tokens_fraction"] = same / len(prompts)
        if pol in ("none", "elastic"):
            # Control: the torch path with another (equally valid) bf16 attention backend,
            # SDPA's math kernel instead of its flash kernel: how often do tokens survive
            # a change of rounding alone?
            from torch.nn.attention import SDPBackend, sdpa_kernel
            use_kernels(False)
            with sdpa_kernel(SDPBackend.MATH):
                ctl = eng.generate(prompts, gp)
            row["control_same_fraction"] = sum(
                a.token_ids == b for a, b in zip(ctl, row["torch_ids"])) / len(prompts)
        # Fidelity: same answer line as full recompute (`none`) under the same rule.
        texts_k = [tok.decode(t, skip_special_tokens=True) for t in row["kernels_ids"]]
        if pol == "none":
            base_answers[:] = [extract_answer(t) for t in texts_k]
        row["answer_agreement_with_none"] = sum(
            extract_answer(t) == b for t, b in zip(texts_k, base_answers)) / len(prompts)
        row.pop("kernels_ids")
        row.pop("torch_ids")
        use_kernels(True)
        out.append(row)
        k, t = row["kernels"], row["torch"]
        log(f"mini {pol:8s} kernels {k['tok_s']:7.1f} tok/s acc {k['accuracy']:.3f} | torch "
            f"{t['tok_s']:7.1f} tok/s acc {t['accuracy']:.3f} | same {row['same_tokens_fraction']:.3f}")


# -- plot and table ------------------------------------------------------------------------

def plot(results, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = [r for r in results.get("runs_8b", []) if r["path"] == "kernels"]
    gens = sorted({r["G"] for r in runs})
    color = {p: f"C{i}" for i, p in enumerate(POLICIES)}
    fig, axes = plt.subplots(1, len(gens) + 1, figsize=(4.2 * (len(gens) + 1), 3.6),
                             squeeze=False)
    axes = axes[0]
    for ax, G in zip(axes, gens):
        for pol in POLICIES:
            xs = sorted((r["batch"], r["tok_s"]) for r in runs if r["G"] == G
                        and r["policy"] == pol)
            if xs:
                ax.plot([x for x, _ in xs], [y for _, y in xs], "o-", label=pol,
                        color=color[pol])
        ax.axhline(14.4, color="gray", ls=":", label="authors' Elastic, b=1")
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("batch")
        ax.set_ylabel("tokens/s")
        ax.set_title(f"LLaDA-8B shape (random), G={G}", fontsize=9)
        ax.legend(fontsize=6)
    ax = axes[-1]
    for row in results.get("mini", []):
        k = row["kernels"]
        y = row.get("answer_agreement_with_none", k["accuracy"])
        ax.plot(k["tok_s"], y, "o", color=color[row["policy"]])
        ax.annotate(f"{row['policy']} (acc {k['accuracy']:.2f})", (k["tok_s"], y), fontsize=7)
    ax.set_xscale("log")
    ax.set_xlabel("tokens/s (mini model, dev tasks, batch 32)")
    ax.set_ylabel("answer = none's answer (fraction)")
    ax.set_title("mini-llada-v1: fidelity vs throughput", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=70)


def merge(paths):
    """Several runs' JSON into one results dict (later runs add rows)."""
    out = None
    for p in paths:
        with open(p) as f:
            r = json.load(f)
        if out is None:
            out = r
            continue
        out["runs_8b"] = out.get("runs_8b", []) + r.get("runs_8b", [])
        have = {m["policy"] for m in r.get("mini", [])}
        out["mini"] = [m for m in out.get("mini", []) if m["policy"] not in have] + r.get(
            "mini", [])
    return out


def table(results):
    c = results.get("ceilings", {})
    lines = [f"card: {results['card']}  date: {results['date']}  copy BW "
             f"{c.get('copy_bw_Bps', 0) / 1e12:.2f} TB/s  bf16 {c.get('bf16_flops', 0) / 1e12:.0f}"
             " TFLOP/s", f"kernel tests: {results.get('kernel_tests')}",
             "| model | G | batch | policy | path | tok/s | ms/step | full ms (xfloor) | "
             "row ms (xfloor) | refresh ms (xfloor) | rows/layer | refresh frac | peak GiB |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in results.get("runs_8b", []):
        def cell(k):
            t = r["types"].get(k)
            return f"{t['mean_ms']:.1f} ({t['x_floor']:.2f}x {t['floor_kind'][0]})" if t else "-"
        lines.append(f"| 8B-rand | {r['G']} | {r['batch']} | {r['policy']} | {r['path']} | "
                     f"{r['tok_s']:.1f} | {r['ms_per_step']:.2f} | {cell('full')} | "
                     f"{cell('row')} | {cell('refresh')} | {r['rows_per_layer']:.1f} | "
                     f"{r['layer_refresh_fraction']:.3f} | {r['peak_mem_GiB']:.1f} |")
    lines.append(f"mini fp32 kernel-vs-torch same tokens: {results.get('mini_fp32_parity')}")
    lines.append("| mini | policy | kernels tok/s | acc | torch tok/s | acc | same tokens | "
                 "control same | answer = none's | steps/req | refresh frac |")
    lines.append("|---|---|---|---|---|---|---|---|---|---|---|")
    for row in results.get("mini", []):
        k, t = row["kernels"], row["torch"]
        lines.append(f"| mini | {row['policy']} | {k['tok_s']:.1f} | {k['accuracy']:.3f} | "
                     f"{t['tok_s']:.1f} | {t['accuracy']:.3f} | "
                     f"{row['same_tokens_fraction']:.3f} | "
                     f"{row.get('control_same_fraction', float('nan')):.3f} | "
                     f"{row.get('answer_agreement_with_none', float('nan')):.3f} | "
                     f"{k['steps_per_request']:.1f} | "
                     f"{k['layer_refresh_fraction']:.3f} |")
    return "\n".join(lines)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=os.environ.get("OUT", "out"))
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--budget-s", type=float, default=480)
    ap.add_argument("--gens", type=int, nargs="+", default=[256, 512])
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 8, 32])
    ap.add_argument("--steps", type=int, default=32)
    ap.add_argument("--steps-none", type=int, default=6)
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--mini-n", type=int, default=0)
    ap.add_argument("--mini-batch", type=int, default=32)
    ap.add_argument("--skip", nargs="*", default=[])
    ap.add_argument("--profile", action="store_true")
    ap.add_argument("--policies", nargs="+", default=POLICIES)
    ap.add_argument("--no-before", action="store_true")
    ap.add_argument("--mini-first", action="store_true")
    ap.add_argument("--no-fp32-parity", action="store_true")
    ap.add_argument("--merge", nargs="+", help="only plot + table of these JSON files")
    args = ap.parse_args()
    if args.merge:
        res = merge(args.merge)
        os.makedirs(args.out, exist_ok=True)
        plot(res, os.path.join(args.out, "gpu_bench.png"))
        print(table(res))
        return
    if args.quick:
        args.gens, args.batches, args.steps, args.mini_n = [256], [1, 8], 8, 64
    os.makedirs(args.out, exist_ok=True)
    results = {"card": torch.cuda.get_device_name(), "date": time.strftime("%Y-%m-%d %H:%M UTC",
               time.gmtime()), "torch": torch.__version__, "argv": sys.argv[1:]}
    try:
        import triton
        results["triton"] = triton.__version__
    except ImportError:
        results["triton"] = None
    log(results)
    if "tests" not in args.skip:
        p = subprocess.run([sys.executable, "-m", "pytest", "-q", "-x",
                            os.path.join(ROOT, "tests", "test_kernels.py")],
                           capture_output=True, text=True, cwd=ROOT,
                           env=dict(os.environ, VLLM_ELASTIC_MINI_MODEL=os.path.join(
                               ROOT, ".models", "mini-llada-v1"), VLLM_ELASTIC_DEV_TASKS=
                               os.path.join(ROOT, ".models", "dev.jsonl")))
        results["kernel_tests"] = p.stdout.strip().splitlines()[-1] if p.stdout else p.stderr
        log("kernel tests:", results["kernel_tests"])
        if p.returncode:
            log(p.stdout[-3000:], p.stderr[-2000:])
    torch.backends.cuda.matmul.allow_tf32 = False
    results["ceilings"] = ceil = ceilings()
    log("ceilings", ceil)

    def save():
        with open(os.path.join(args.out, "gpu_bench.json"), "w") as f:
            json.dump(results, f, indent=1)

    if args.profile:
        profile_8b(args, ceil)
        return
    try:
        if args.mini_first and "mini" not in args.skip:
            run_mini(args, results)
            save()
        if "8b" not in args.skip:
            run_8b(args, ceil, results)
            save()
        if not args.mini_first and "mini" not in args.skip:
            run_mini(args, results)
    finally:
        save()
        try:
            plot(results, os.path.join(args.out, "gpu_bench.png"))
        except Exception as e:  # noqa: BLE001
            log("plot failed:", e)
        t = table(results)
        with open(os.path.join(args.out, "gpu_bench_table.md"), "w") as f:
            f.write(t + "\n")
        print(t)


if __name__ == "__main__":
    main()
