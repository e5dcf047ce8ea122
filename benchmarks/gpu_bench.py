"""GPU benchmark of the engine core: one script, one device call per part.

    python benchmarks/gpu_bench.py --out $OUT [--parts tests,ceilings,mini,8b] [--budget-s 540]

Parts (each skipped, and said so, once the time budget is spent):
* tests: tests/test_kernels.py (Triton kernels vs torch on fresh random inputs);
* ceilings: device-to-device copy bandwidth (bytes read + written) and the bf16 matrix
  product rate (8192^3, random data), the two floors' denominators;
* mini: mini-llada-v1 on the dev tasks (real dynamics), bf16: per policy tokens/s,
  accuracy, answer agreement with `none`, compute and layer-refresh fractions, with the
  fused path (kernels + CUDA graphs) and with the plain torch path, and the fraction of
  prompts on which both give the same tokens (float32 too); Elastic-Cache's refresh
  pattern (the layer each step's refresh started at) is recorded for the 8B part;
* 8b: LLaDA-8B shape with random bf16 weights built on the GPU: every policy at each
  batch and G (B = 32, tau = 0.9, stop at EOS off; random weights commit ~1 token per step,
  so this measures cost per step): tokens/s, steps/s, per-step latency by step type (full
  pass / window-only / partial-depth refresh), rows per layer, layer-refresh fraction,
  peak memory, and per step type the floor max(bytes / bandwidth, FLOPs / matmul rate) and
  the measured multiple of it. `elastic@mini` replays the mini model's recorded refresh
  pattern (depth scaled to 32 layers) on the 8B shape, since random weights never drift;
* diag: a torch.profiler table of 8B steps.
Full numbers go to $OUT/gpu_bench.json, a plot to $OUT/gpu_bench.png; a table is printed
last. `--merge a.json b.json` rebuilds table and plot from earlier runs.
"""

from __future__ import annotations

import argparse
import json
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
from vllm_elastic.kernels import use_kernels  # noqa: E402
from vllm_elastic.evaluation import extract_answer, is_correct  # noqa: E402

POLICIES = ["none", "prefix", "dual", "elastic", "spa", "dkv"]
AUTHORS_ELASTIC_TOK_S = {256: 14.4, 512: 14.7}  # algorithms.md section 7, H100, batch 1
T0 = time.time()


def log(*a):
    print(f"[{time.time() - T0:6.1f}s] " + " ".join(str(x) for x in a), flush=True)


def over_budget(args) -> bool:
    return time.time() - T0 > args.budget_s


# -- the two ceilings ----------------------------------------------------------------------

def _time_cuda(fn, reps=10) -> float:
    ev = [torch.cuda.Event(enable_timing=True) for _ in range(2)]
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        ev[0].record()
        fn()
        ev[1].record()
        torch.cuda.synchronize()
        times.append(ev[0].elapsed_time(ev[1]) / 1e3)
    return statistics.median(times)


def _copy_rate() -> float:
    a = torch.randn(1 << 20, 1024, device="cuda").to(torch.bfloat16)  # 2 GiB
    b = torch.empty_like(a)
    return 2 * a.numel() * 2 / _time_cuda(lambda: b.copy_(a))


def _matmul_rate() -> float:
    x = torch.randn(8192, 8192, device="cuda").to(torch.bfloat16)
    y = torch.randn(8192, 8192, device="cuda").to(torch.bfloat16)
    return 2 * 8192 ** 3 / _time_cuda(lambda: x @ y)


def ceilings() -> dict:
    out = {"copy_bw_Bps": _copy_rate(), "bf16_flops": _matmul_rate()}
    torch.cuda.empty_cache()
    return out


# -- work of a step: the fewest FLOPs and bytes, from each request's stats -------------------

def step_work(cfg, engine, reqs, before, after, n_cands):
    """(flops, bytes, type) of one step, from the per-request stats deltas: each pass
    reads every layer's weights once, each request's K/V once per layer, writes its rows'
    K/V and layer inputs; GEMM and attention FLOPs of every row."""
    d, L, V = cfg.d_model, cfg.n_layers, cfg.embedding_size
    p_layer = 4 * d * d + 3 * d * cfg.mlp_hidden_size
    el = 2
    flops = byts = 0.0
    kind = "row"
    refresh_from = []
    for r, b, a in zip(reqs, before, after):
        if a.steps == b.steps:
            continue
        K = r.total_len
        rows = a.rows_computed - b.rows_computed
        passes = []  # (rows, layers)
        if a.full_steps > b.full_steps:
            passes.append((K, L))
            kind = "full" if kind != "refresh" else kind
        elif a.drift_events > b.drift_events:
            s = L - (a.layers_refreshed - b.layers_refreshed)
            n = (rows - K * (L - s)) / s if s else 0
            passes += [(n, L), (K, L - s)]
            refresh_from.append(s)
            kind = "refresh"
        else:
            passes.append((rows / L, L))
        for n, layers in passes:
            flops += layers * (2 * n * p_layer + 4 * n * K * d)
            byts += layers * el * (2 * K * d + n * (3 * d + 2 * d))
    weight_layers = L + (L - min(refresh_from) if refresh_from else 0)
    byts += weight_layers * p_layer * el + V * d * el
    flops += 2 * n_cands * d * V
    return flops, byts, kind


def special_8b() -> SpecialIds:
    c = llada_8b_config()
    return SpecialIds(mask=c.mask_token_id, eos=c.eos_token_id, eot=126348,
                      bos=c.bos_token_id)


def params_for(policy: str, G: int) -> GenerationParams:
    return GenerationParams.from_dict({"policy": policy, "gen_length": G, "block_length": 32,
                                       "threshold": 0.9, "stop_at_eos": False})


def timed_run(engine, prompts, params, steps, warm, ceil, override=None) -> dict:
    """Admit the requests, run `warm` steps untimed (step 0 is a full pass), time the next
    `steps` steps one by one; abort. Per-step times, types, floors."""
    import copy

    cfg = engine.model.cfg
    runner = engine.runner
    runner.refresh_override = override
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    reqs = [engine.add_request(p, params) for p in prompts]
    for _ in range(warm):
        engine.step()
    counts0 = runner.pass_counts()
    per_step = []
    s0 = [copy.copy(r.stats) for r in reqs]
    for _ in range(steps):
        if not engine.running:
            break
        b = [copy.copy(r.stats) for r in reqs]
        n_cand = sum(len(r.candidates()) for r in engine.running)
        torch.cuda.synchronize()
        t = time.perf_counter()
        engine.step()
        torch.cuda.synchronize()
        dt = time.perf_counter() - t
        a = [copy.copy(r.stats) for r in reqs]
        fl, by, kind = step_work(cfg, engine, reqs, b, a, n_cand)
        fb, ff = by / ceil["copy_bw_Bps"], fl / ceil["bf16_flops"]
        per_step.append({"type": kind, "s": dt, "flops": fl, "bytes": by,
                         "floor_s": max(fb, ff), "floor": "b" if fb >= ff else "f",
                         "tokens": sum(x.tokens_committed - y.tokens_committed
                                       for x, y in zip(a, b))})
    s1 = [copy.copy(r.stats) for r in reqs]
    for r in reqs:
        engine.abort(r.id)
    runner.refresh_override = None
    counts = {k: v - counts0[k] for k, v in runner.pass_counts().items()}
    peak = torch.cuda.max_memory_allocated() / 2 ** 30
    total = sum(p["s"] for p in per_step)
    tokens = sum(p["tokens"] for p in per_step)
    L = cfg.n_layers

    def delta(f):
        return sum(f(x) - f(y) for x, y in zip(s1, s0))

    n = len(per_step)
    types = {}
    for kind in ("full", "row", "refresh"):
        xs = [p for p in per_step if p["type"] == kind]
        if xs:
            ms = [p["s"] * 1e3 for p in xs]
            fl = statistics.mean(p["floor_s"] * 1e3 for p in xs)
            t_s = sum(p["s"] for p in xs)
            types[kind] = {"count": len(xs), "mean_ms": statistics.mean(ms),
                           "median_ms": statistics.median(ms), "floor_ms": fl,
                           "floor": max("bf", key=[p["floor"] for p in xs].count),
                           "x_floor": statistics.mean(ms) / max(fl, 1e-9),
                           "TFLOPs": sum(p["flops"] for p in xs) / t_s / 1e12,
                           "GBps": sum(p["bytes"] for p in xs) / t_s / 1e9}
    return {"steps_timed": n, "time_s": total, "tokens": tokens,
            "tok_s": tokens / total if total else 0.0, "steps_s": n / total if total else 0.0,
            "ms_per_step": 1e3 * total / max(1, n),
            "rows_per_layer": delta(lambda s: s.rows_computed) / max(1, n * L * len(prompts)),
            "compute_fraction": delta(lambda s: s.rows_computed)
            / max(1, delta(lambda s: s.rows_full)),
            "layer_refresh_fraction": delta(lambda s: s.layers_refreshed)
            / max(1, delta(lambda s: s.layers_total)),
            "peak_mem_GiB": peak, "types": types, "passes": counts,
            "step_ms": [round(p["s"] * 1e3, 3) for p in per_step],
            "step_types": "".join(p["type"][0] for p in per_step)}


def pattern_override(pattern: list[list[float | None]], L: int):
    """Replay recorded refresh starts (fractions of depth) request by request, step by
    step, cycling; a request's index is its order of admission."""
    index: dict[str, int] = {}

    def override(r, start):
        i = index.setdefault(r.id, len(index))
        seq = pattern[i % len(pattern)]
        f = seq[(r.step_index - 1) % len(seq)] if seq else None
        if f is None:
            return None
        return min(L - 1, max(1, round(f * L)))
    return override


def pass_reserve_bytes(cfg, max_rows: int) -> int:
    """Memory a pass of `max_rows` rows needs besides the KV pool: its widest activations
    (qkv, gate/up, SwiGLU output and a few hidden-size buffers, in bf16) plus the CUDA-graph
    pool bound."""
    from vllm_elastic.core.fused.graphs import GRAPH_MAX_BYTES

    per_row = 2 * (3 * cfg.d_model + 3 * cfg.mlp_hidden_size + 6 * cfg.d_model)
    return max_rows * per_row + GRAPH_MAX_BYTES


def largest_batch(model, G: int, P: int, policies_bytes: int, max_rows: int) -> int:
    """Largest batch whose pages fit in 85% of the GPU memory left after a pass's
    activations (passes are split at `max_rows` rows), a multiple of 16."""
    free, _ = torch.cuda.mem_get_info()
    per = (P + G) * policies_bytes
    avail = free - pass_reserve_bytes(model.cfg, max_rows)
    return max(16, min(256, int(0.85 * avail / per) // 16 * 16))


def config_order(batches: list[int], policies: list[str], pattern: bool, largest: bool
                 ) -> list[tuple[int, str]]:
    """(batch, policy) in the order the targets need them: Elastic-Cache, the dual cache and
    full recompute (and Elastic with the mini model's refresh pattern) at batch 1 and the
    largest listed batch first, then the rest; with `largest`, the largest batch that fits
    (last in `batches`) for the window-only policies only."""
    main = [p for p in ("elastic", "dual", "none") if p in policies]
    if pattern and "elastic" in policies:
        main.append("elastic@mini")
    rest = [p for p in policies if p not in main]
    listed = batches[:-1] if largest else batches
    first = [b for b in (min(listed), max(listed))]
    first = sorted(set(first), key=first.index)
    out = [(b, p) for b in first for p in main]
    out += [(b, p) for b in listed if b not in first for p in main]
    out += [(b, p) for b in listed for p in rest]
    if largest:
        out += [(batches[-1], p) for p in ("elastic", "dual") if p in policies]
    return out


def run_8b(args, ceil, results, pattern):
    cfg = llada_8b_config()
    log("building the LLaDA-8B-shaped random model (bf16, on the GPU)")
    model = LLaDAModel.random(cfg, torch.bfloat16, "cuda")
    torch.cuda.synchronize()
    g = torch.Generator().manual_seed(0)
    P = args.prompt_len
    runs = results.setdefault("runs_8b", [])
    L = cfg.n_layers
    slot_bytes = 2 * (2 * L * cfg.d_model + (L + 1) * cfg.d_model)
    for G in args.gens:
        batches = list(args.batches)
        if args.largest:
            batches.append(largest_batch(model, G, P, slot_bytes, args.max_rows))
        prompts = [torch.randint(0, 126000, (P,), generator=g).tolist()
                   for _ in range(max(batches))]
        eng = Engine(model, special_8b(), max_batch_size=max(batches), page_size=16,
                     max_request_tokens=P + G)
        eng.runner.max_rows = args.max_rows  # full passes of large batches run in groups
        configs = config_order(batches, args.policies, bool(pattern), args.largest)
        for batch, pol in configs:
            if over_budget(args):
                log(f"budget spent: skipping 8B G={G} batch={batch} {pol}")
                continue
            name = pol.split("@")[0]
            heavy = name in ("none", "prefix", "dkv", "spa") or "@" in pol
            steps = args.steps_heavy if heavy else args.steps
            if batch >= 64 and heavy:
                steps = max(2, steps // 2)
            ov = pattern_override(pattern, L) if "@" in pol else None
            try:
                r = timed_run(eng, prompts[:batch], params_for(name, G), steps, args.warm,
                              ceil, ov)
            except torch.cuda.OutOfMemoryError as e:
                log(f"OOM 8B G={G} b={batch} {pol}: {e}")
                for rq in list(eng.running) + list(eng.waiting):
                    eng.abort(rq.id)
                torch.cuda.empty_cache()
                continue
            r.update({"G": G, "batch": batch, "policy": pol, "path": "fused"})
            runs.append(r)
            log(f"8B G={G} b={batch} {pol:12s} {r['tok_s']:8.1f} tok/s "
                f"{r['ms_per_step']:8.2f} ms/step [{r['step_types']}] passes={r['passes']} "
                + " ".join(f"{k}:{v['mean_ms']:.1f}ms(med {v['median_ms']:.1f})x"
                           f"{v['x_floor']:.2f}{v['floor']}" for k, v in r["types"].items()))
        if G == args.gens[0] and args.before and not over_budget(args):
            use_kernels(False)  # the plain torch path, for before/after
            for batch in (1, max(args.batches)):
                for pol in ("none", "elastic"):
                    r = timed_run(eng, prompts[:batch], params_for(pol, G),
                                  4 if pol == "none" else 8, 1, ceil)
                    r.update({"G": G, "batch": batch, "policy": pol, "path": "torch"})
                    runs.append(r)
                    log(f"8B torch path G={G} b={batch} {pol} {r['tok_s']:.1f} tok/s "
                        f"{r['ms_per_step']:.1f} ms/step")
            use_kernels(True)
        del eng
        torch.cuda.empty_cache()
    del model
    torch.cuda.empty_cache()


# -- the mini model -----------------------------------------------------------------------

def mini_setup(args):
    from model_executor.tokenizer import load_tokenizer, render_prompt

    folder = os.path.join(ROOT, ".models", "mini-llada-v1")
    items = [json.loads(line) for line in open(os.path.join(ROOT, ".models", "dev.jsonl"))]
    if args.mini_n and args.mini_n < len(items):  # interleaved: every task kind
        items = items[::len(items) // args.mini_n][:args.mini_n]
    tok = load_tokenizer(folder)
    prompts = [render_prompt(tok, {"messages": it["messages"]}) for it in items]
    return folder, items, tok, prompts


def run_mini(args, results):
    folder, items, tok, prompts = mini_setup(args)
    mx = max(len(p) for p in prompts) + 256
    res = results.setdefault("mini", [])
    pattern: list[list[float | None]] = []
    # Float32: the fused path (kernels + graphs) must give the torch path's tokens.
    torch.backends.cuda.matmul.allow_tf32 = False
    eng32 = Engine.from_pretrained(folder, dtype=torch.float32, device="cuda",
                                   max_batch_size=args.mini_batch, max_request_tokens=mx)
    sub = prompts[:args.fp32_n]
    fp32 = results.setdefault("mini_fp32_same", {})
    for pol in (POLICIES if args.fp32_n else []):
        gp = GenerationParams.from_dict({"policy": pol, "gen_length": 128})
        use_kernels(False)
        a = eng32.generate(sub, gp)
        use_kernels(True)
        b = eng32.generate(sub, gp)
        fp32[pol] = sum(x.token_ids == y.token_ids for x, y in zip(a, b)) / len(sub)
        log(f"mini fp32 fused vs torch path, same tokens: {pol} {fp32[pol]:.3f}")
    del eng32
    eng = Engine.from_pretrained(folder, dtype=torch.bfloat16, device="cuda",
                                 max_batch_size=args.mini_batch, max_request_tokens=mx)
    policies = args.mini_policies
    for pol in policies:  # compile and capture outside the timed runs
        eng.generate(prompts[:args.mini_batch], GenerationParams.from_dict(
            {"policy": pol, "gen_length": 256}))
    base = None
    L = eng.model.cfg.n_layers
    for pol in policies:
        if over_budget(args):
            log(f"budget spent: skipping mini {pol}")
            continue
        gp = GenerationParams.from_dict({"policy": pol, "gen_length": 256, "block_length": 32,
                                         "threshold": 0.9})
        row = {"policy": pol, "n": len(prompts), "G": 256, "batch": args.mini_batch}
        ids = {}
        for path in ("fused", "torch") if args.mini_torch else ("fused",):
            use_kernels(path == "fused")
            rec: dict[str, list] = {}
            if path == "fused" and pol == "elastic":
                def record(r, start, rec=rec):
                    rec.setdefault(r.id, []).append(None if start is None else start / L)
                    return start
                eng.runner.refresh_override = record
            if path == "fused":
                eng.runner.start_fused_timing()
            torch.cuda.synchronize()
            t = time.perf_counter()
            out = eng.generate(prompts, gp)
            torch.cuda.synchronize()
            dt = time.perf_counter() - t
            split = eng.runner.fused_timing()
            eng.runner.refresh_override = None
            if rec:
                pattern = list(rec.values())
            toks = sum(len(r.token_ids) for r in out)
            texts = [tok.decode(r.token_ids, skip_special_tokens=True) for r in out]
            row[path] = {
                "tok_s": toks / dt, "time_s": dt,
                "accuracy": sum(is_correct(x, it["answer"]) for x, it in zip(texts, items))
                / len(items),
                "steps_per_request": statistics.mean(r.stats["steps"] for r in out),
                "compute_fraction": statistics.mean(r.stats["compute_fraction"] for r in out),
                "layer_refresh_fraction": statistics.mean(r.stats["layer_refresh_fraction"]
                                                          for r in out),
                # fused path: host work / waits for the device / device time of the passes
                "time_split": split}
            ids[path] = [r.token_ids for r in out]
            if path == "fused":
                answers = [extract_answer(x) for x in texts]
                if pol == "none":
                    base = answers
                if base is not None:
                    row["answer_agreement_with_none"] = sum(
                        a == b for a, b in zip(answers, base)) / len(answers)
        use_kernels(True)
        if "torch" in ids:
            row["same_tokens_fused_vs_torch"] = sum(
                a == b for a, b in zip(ids["fused"], ids["torch"])) / len(prompts)
        res.append(row)
        f, t = row["fused"], row.get("torch", {})
        log(f"mini {pol:8s} fused {f['tok_s']:8.1f} tok/s acc {f['accuracy']:.3f} cf "
            f"{f['compute_fraction']:.3f} | torch {t.get('tok_s', 0):7.1f} tok/s | same "
            f"{row.get('same_tokens_fused_vs_torch', float('nan')):.3f} | agr "
            f"{row.get('answer_agreement_with_none', float('nan')):.3f} | passes "
            f"{eng.runner.pass_counts()} | split {f.get('time_split')}")
    results["mini_pattern"] = pattern
    results["mini_passes"] = eng.runner.pass_counts()
    return pattern


def run_diag(args, results):
    """A torch.profiler table of 8B steps (where the time goes)."""
    from torch.profiler import ProfilerActivity, profile

    cfg = llada_8b_config()
    model = LLaDAModel.random(cfg, torch.bfloat16, "cuda")
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(0, 126000, (128,), generator=g).tolist() for _ in range(32)]
    eng = Engine(model, special_8b(), max_batch_size=32, page_size=16, max_request_tokens=640)
    for pol, batch in [("elastic", 1), ("elastic", 32), ("dual", 32)]:
        reqs = [eng.add_request(p, params_for(pol, 512)) for p in prompts[:batch]]
        for _ in range(8):
            eng.step()
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            for _ in range(4):
                eng.step()
            torch.cuda.synchronize()
        for r in reqs:
            eng.abort(r.id)
        ka = prof.key_averages()
        n_k = sum(e.count for e in ka if e.device_type.name == "CUDA")
        print(f"=== profile {pol} batch {batch}: {n_k / 4:.0f} GPU kernels/step; passes "
              f"{eng.runner.pass_counts()}")
        print(ka.table(sort_by="self_cuda_time_total", row_limit=16, max_name_column_width=70))
        print(ka.table(sort_by="self_cpu_time_total", row_limit=10, max_name_column_width=70))


# -- plot and table ------------------------------------------------------------------------

def plot(results, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = [r for r in results.get("runs_8b", []) if r["path"] == "fused"]
    gens = sorted({r["G"] for r in runs})
    pols = POLICIES + ["elastic@mini"]
    color = {p: f"C{i}" for i, p in enumerate(pols)}
    fig, axes = plt.subplots(1, len(gens) + 1, figsize=(4.2 * (len(gens) + 1), 3.6),
                             squeeze=False)
    axes = axes[0]
    for ax, G in zip(axes, gens):
        for pol in pols:
            xs = sorted((r["batch"], r["tok_s"]) for r in runs if r["G"] == G
                        and r["policy"] == pol)
            if xs:
                ax.plot([x for x, _ in xs], [y for _, y in xs], "o-", label=pol,
                        color=color[pol])
        if G in AUTHORS_ELASTIC_TOK_S:
            a = AUTHORS_ELASTIC_TOK_S[G]
            ax.axhline(a, color="gray", ls=":", label="authors' Elastic, b=1")
            ax.plot([1], [10 * a], "k_", ms=14, label="10x authors (b=1 bar)")
            ax.plot([32], [50 * a], "kx", ms=7, label="50x authors (b=32 bar)")
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("batch")
        ax.set_ylabel("tokens/s")
        ax.set_title(f"LLaDA-8B shape (random bf16), G={G}", fontsize=9)
        ax.legend(fontsize=6)
    ax = axes[-1]
    for row in results.get("mini", []):
        f = row["fused"]
        y = row.get("answer_agreement_with_none", f["accuracy"])
        ax.plot(f["tok_s"], y, "o", color=color[row["policy"]])
        ax.annotate(f"{row['policy']} (acc {f['accuracy']:.2f})", (f["tok_s"], y), fontsize=7)
    ax.set_xscale("log")
    ax.set_xlabel("tokens/s (mini model, dev tasks, batch 32, bf16)")
    ax.set_ylabel("answer = none's answer (fraction)")
    ax.set_title("mini-llada-v1: fidelity vs throughput", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=70)


def merge(paths):
    """Several runs' JSON in one: for the same (G, batch, policy, path) the later file
    wins; a mini row measured on both paths is kept over one on the fused path only (the
    same-tokens column needs both, from one run), else the later wins; other keys are
    kept from the first file that has them."""
    out = None
    for p in paths:
        with open(p) as f:
            r = json.load(f)
        for x in r.get("runs_8b", []):
            x["source"] = os.path.basename(p)
        if out is None:
            out = r
            continue
        for k, v in r.items():
            if k == "runs_8b":
                key = {(x["G"], x["batch"], x["policy"], x["path"]) for x in v}
                out[k] = [x for x in out.get(k, []) if (x["G"], x["batch"], x["policy"],
                                                        x["path"]) not in key] + v
            elif k == "mini":
                rows = {m["policy"]: m for m in out.get(k, [])}
                for m in v:
                    old = rows.get(m["policy"])
                    if old is None or "torch" in m or "torch" not in old:
                        rows[m["policy"]] = m
                out[k] = [rows[p] for p in POLICIES if p in rows]
            elif k not in out or not out[k]:
                out[k] = v
    out["runs_8b"] = sorted(out.get("runs_8b", []), key=lambda x: (
        x["path"] != "fused", x["G"], x["batch"], (POLICIES + ["elastic@mini"]).index(
            x["policy"])))
    return out


def table(results):
    c = results.get("ceilings", {})
    lines = [f"card: {results.get('card')}  date: {results.get('date')}  copy "
             f"{c.get('copy_bw_Bps', 0) / 1e12:.2f} TB/s  bf16 "
             f"{c.get('bf16_flops', 0) / 1e12:.0f} TFLOP/s  kernel tests: "
             f"{results.get('kernel_tests')}",
             "| G | batch | policy | path | tok/s | ms/step | full ms (x floor) | window ms "
             "(x floor) | refresh ms (x floor) | rows/layer | refresh frac | peak GiB |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in results.get("runs_8b", []):
        def cell(k, r=r):
            t = r["types"].get(k)
            if not t:
                return "-"
            return f"{t['mean_ms']:.2f} ({t['x_floor']:.2f}x {t['floor']})"
        lines.append(f"| {r['G']} | {r['batch']} | {r['policy']} | {r['path']} | "
                     f"{r['tok_s']:.1f} | {r['ms_per_step']:.2f} | {cell('full')} | "
                     f"{cell('row')} | {cell('refresh')} | {r['rows_per_layer']:.1f} | "
                     f"{r['layer_refresh_fraction']:.3f} | {r['peak_mem_GiB']:.1f} |")
    lines.append(f"mini fp32, fused vs torch path, same tokens: {results.get('mini_fp32_same')}")
    lines += ["| mini policy | fused tok/s | torch tok/s | acc | answer = none's | compute frac "
              "| refresh frac | same tokens fused/torch (bf16) | passes/step | host ms/step | "
              "wait ms/step | GPU ms/step |", "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for row in results.get("mini", []):
        f, t = row["fused"], row.get("torch", {})
        sp = f.get("time_split") or {}
        n = max(1, sp.get("steps", 0))
        split = (f"{sp['passes'] / n:.2f} | {sp['host_s'] * 1e3 / n:.2f} | "
                 f"{sp['wait_s'] * 1e3 / n:.2f} | {sp['gpu_s'] * 1e3 / n:.2f}"
                 if sp else "- | - | - | -")
        lines.append(f"| {row['policy']} | {f['tok_s']:.0f} | {t.get('tok_s', 0):.0f} | "
                     f"{f['accuracy']:.3f} | {row.get('answer_agreement_with_none', 0):.3f} | "
                     f"{f['compute_fraction']:.3f} | {f['layer_refresh_fraction']:.3f} | "
                     f"{row.get('same_tokens_fused_vs_torch', float('nan')):.3f} | {split} |")
    return "\n".join(lines)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=os.environ.get("OUT", "out"))
    ap.add_argument("--parts", default="tests,ceilings,mini,8b")
    ap.add_argument("--budget-s", type=float, default=540)
    ap.add_argument("--gens", type=int, nargs="+", default=[256, 512, 1024])
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 8, 32])
    ap.add_argument("--largest", action="store_true", help="also the largest batch that fits")
    ap.add_argument("--policies", nargs="+", default=POLICIES)
    ap.add_argument("--steps", type=int, default=24)
    ap.add_argument("--steps-heavy", type=int, default=6)
    ap.add_argument("--warm", type=int, default=4)
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--max-rows", type=int, default=32768,
                    help="rows a pass may compute (8B part; larger batches run in groups)")
    ap.add_argument("--before", action="store_true", help="plain torch path rows (8B)")
    ap.add_argument("--mini-n", type=int, default=0)
    ap.add_argument("--mini-batch", type=int, default=32)
    ap.add_argument("--fp32-n", type=int, default=48, help="0: no float32 parity")
    ap.add_argument("--mini-policies", nargs="+", default=POLICIES)
    ap.add_argument("--mini-torch", type=int, default=1, help="0: fused path only")
    ap.add_argument("--pattern", help="a JSON with mini_pattern from an earlier run")
    ap.add_argument("--merge", nargs="+")
    args = ap.parse_args()
    os.makedirs(args.out, exist_ok=True)
    if args.merge:
        res = merge(args.merge)
        plot(res, os.path.join(args.out, "gpu_bench.png"))
        print(table(res))
        return
    parts = args.parts.split(",")
    import triton
    results = {"card": torch.cuda.get_device_name(), "torch": torch.__version__,
               "triton": triton.__version__, "argv": sys.argv[1:],
               "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
    log(results)

    def save():
        with open(os.path.join(args.out, "gpu_bench.json"), "w") as f:
            json.dump(results, f, indent=1)

    try:
        if "tests" in parts:
            p = subprocess.run([sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider",
                                os.path.join(ROOT, "tests", "test_kernels.py")],
                               capture_output=True, text=True, cwd=ROOT,
                               env=dict(os.environ, VLLM_ELASTIC_MINI_MODEL=os.path.join(
                                   ROOT, ".models", "mini-llada-v1"),
                                   VLLM_ELASTIC_DEV_TASKS=os.path.join(ROOT, ".models",
                                                                       "dev.jsonl")))
            lines = (p.stdout or p.stderr).strip().splitlines()
            results["kernel_tests"] = lines[-1] if lines else f"rc {p.returncode}"
            log("kernel tests:", results["kernel_tests"])
            if p.returncode:
                log(p.stdout[-4000:], p.stderr[-2000:])
        torch.backends.cuda.matmul.allow_tf32 = False
        results["ceilings"] = ceil = ceilings()
        log("ceilings", ceil)
        if "diag" in parts:
            run_diag(args, results)
            save()
        pattern = None
        if args.pattern:
            with open(args.pattern) as f:
                pattern = json.load(f).get("mini_pattern")
        if "mini" in parts:
            pattern = run_mini(args, results)
            save()
        if "8b" in parts:
            run_8b(args, ceil, results, pattern)
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
