"""The vLLM plugin on a GPU, against the engine core on the same GPU: one script, one table.

    python benchmarks/vllm_gpu.py --out $OUT [--parts serve_float32,speed,offline,serve_bfloat16]

Parts, in the order given (each skipped, and said so, once the time budget is spent):
* serve_float32, serve_bfloat16: `vllm-elastic serve` (= `vllm serve` with the plugin) on the mini model, float32
  and bfloat16: 32 concurrent requests over every policy, OpenAI chat (plain and streaming)
  and completions (plain and streaming); a bad request (unknown policy) must get HTTP 400;
  /metrics must show the `vllm_elastic:*` cache statistics. In float32 every answer's tokens
  are compared with the standalone core's fused path on the same prompt ids, run as one
  batch and run request by request (the two references also measure the core's own batch
  sensitivity).
* offline: `LLM.generate` on 64 dev prompts over every policy, float32, the same comparison.
* speed: the LLaDA-8B shape with random bf16 weights (`--load-format dummy`), G = 512,
  prompt 128, one canvas a request, Elastic-Cache and the dual cache at batch 1 and 32:
  tokens/s of `LLM.generate` and of the core's `Engine.generate` on the same requests, one
  warm-up run of each first; the plugin's CUDA-graph pass counts come from its worker.
Everything goes to $OUT/vllm_gpu.json; the table is printed last.
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from tests.harness.server import Server, ServerConfig  # noqa: E402

POLICIES = ["none", "prefix", "dual", "elastic", "spa", "dkv"]
SERVE_CFG = {"gen_length": 128, "block_length": 32}
T0 = time.time()


def log(*a) -> None:
    print(f"[{time.time() - T0:6.1f}s] " + " ".join(str(x) for x in a), flush=True)


def over_budget(args) -> bool:
    return time.time() - T0 > args.budget_s


def plugin_env() -> dict[str, str]:
    return dict(os.environ, VLLM_PLUGINS="elastic", PYTHONPATH=os.pathsep.join(
        [ROOT] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]))


# -- the engine core's references ----------------------------------------------------------

def core_tokens(model_dir: str, dtype: str, jobs: list[tuple[list[int], dict]],
                batched: bool) -> list[list[int]]:
    """The core's fused-path tokens for (prompt ids, params dict) jobs: all in one
    generate() call, or each alone."""
    import torch

    from vllm_elastic.core import Engine, GenerationParams

    eng = Engine.from_pretrained(model_dir, dtype=getattr(torch, dtype), device="cuda",
                                 max_batch_size=max(1, len(jobs)), max_request_tokens=1024)
    params = [GenerationParams.from_dict(p) for _, p in jobs]
    if batched:
        res = eng.generate([p for p, _ in jobs], params)
    else:
        res = [eng.generate([p], [gp])[0] for (p, _), gp in zip(jobs, params)]
    del eng
    torch.cuda.empty_cache()
    return [r.token_ids for r in res]


def compare(got: list[list[int]], refs: dict[str, list[list[int]]], max_tokens: list) -> dict:
    out = {}
    for name, ref in refs.items():
        want = [r[:m] if m else r for r, m in zip(ref, max_tokens)]
        out[name] = sum(list(g) == w for g, w in zip(got, want))
    out["n"] = len(got)
    return out


# -- serve -------------------------------------------------------------------------------

def ask(client, kind: str, stream: bool, messages, prompt_ids, xargs: dict, max_tokens):
    """One request; returns (prompt ids, token ids, finish reason)."""
    extra = {"vllm_xargs": xargs, "return_token_ids": True}
    kw = {"temperature": 0.0, "max_tokens": max_tokens}
    if kind == "chat":
        create = client.chat.completions.create
        kw["messages"] = messages
    else:
        create = client.completions.create
        kw["prompt"] = prompt_ids
    if not stream:
        r = create(model="mini", extra_body=extra, **kw)
        c = r.choices[0]
        pids = r.prompt_token_ids if kind == "chat" else c.prompt_token_ids
        return list(pids), list(c.token_ids), c.finish_reason
    pids, ids, finish = None, [], None
    for ch in create(model="mini", stream=True, extra_body=extra, **kw):
        if getattr(ch, "prompt_token_ids", None):
            pids = ch.prompt_token_ids
        for c in ch.choices:
            if getattr(c, "prompt_token_ids", None):
                pids = c.prompt_token_ids
            ids += getattr(c, "token_ids", None) or []
            finish = c.finish_reason or finish
    return list(pids or []), ids, finish


def run_serve(args, items, prompts, dtype: str, res: dict) -> None:
    import openai

    log(f"serve {dtype}: starting the server")
    cfg = ServerConfig(args.model, served_model_name="mini", elastic=SERVE_CFG, dtype=dtype,
                       block_size=16, max_num_seqs=64, dev_mode=False, log_requests=False,
                       extra_args=["--gpu-memory-utilization", "0.3"],
                       env={"PYTHONPATH": plugin_env()["PYTHONPATH"]})
    srv = Server(cfg, os.path.join(args.out, f"serve_{dtype}.log")).start()
    start_s = srv.startup_s
    try:
        client = openai.OpenAI(base_url=srv.base + "/v1", api_key="none", max_retries=0,
                               timeout=600)
        jobs = []
        for i in range(32):
            kind = "chat" if i % 4 < 2 else "completion"
            stream = i % 2 == 1
            xargs = {"policy": POLICIES[i % len(POLICIES)]}
            max_tokens = 12 if i % 8 == 7 else 512
            jobs.append((kind, stream, items[i]["messages"], prompts[i], xargs, max_tokens))
        t = time.time()
        with cf.ThreadPoolExecutor(len(jobs)) as pool:
            answers = list(pool.map(lambda j: ask(client, *j), jobs))
        wall = time.time() - t
        bad = {}
        try:
            client.chat.completions.create(model="mini", messages=[{"role": "user",
                                                                    "content": "Hi"}],
                                           extra_body={"vllm_xargs": {"policy": "bogus"}})
            bad = {"status": 200}
        except openai.BadRequestError as e:
            bad = {"status": e.status_code, "message": str(e)[:200]}
        after = ask(client, "chat", False, items[0]["messages"], None, {"policy": "elastic"},
                    16)
        time.sleep(1.5)
        text = srv.metrics()
        names = ["denoising_steps_total", "full_passes_total", "tokens_committed_total",
                 "rows_computed_total", "rows_full_total", "drift_events_total",
                 "compute_fraction", "layer_refresh_fraction", "tokens_per_step"]
        mets = {n: text.get("vllm_elastic:" + n) for n in names}
        mets["kv_cache_usage_perc"] = text.get("vllm:kv_cache_usage_perc")
    finally:
        srv.stop()
    out = {"dtype": dtype, "start_s": start_s, "requests": len(jobs), "wall_s": wall,
           "tokens": sum(len(a[1]) for a in answers),
           "finish": {f: sum(a[2] == f for a in answers) for f in ("stop", "length")},
           "kinds": sorted({f"{j[0]}{'-stream' if j[1] else ''}" for j in jobs}),
           "bad_request": bad, "good_after_bad": bool(after[1]), "metrics": mets}
    # The chat prompts vLLM rendered must be the chat template's.
    out["prompt_ids_equal"] = sum(a[0] == p for a, p in zip(answers, prompts))
    if dtype == "float32":
        cjobs = [(a[0], {**SERVE_CFG, **j[4]}) for a, j in zip(answers, jobs)]
        refs = {"core_batched": core_tokens(args.model, dtype, cjobs, True),
                "core_alone": core_tokens(args.model, dtype, cjobs, False)}
        out["same_tokens"] = compare([a[1] for a in answers], refs, [j[5] for j in jobs])
        out["mismatch"] = [i for i, (a, r, j) in enumerate(zip(answers, refs["core_alone"],
                                                              jobs))
                           if a[1] != r[:j[5]]]
    res.setdefault("serve", []).append(out)
    log(f"serve {dtype}: {json.dumps(out)}")


# -- offline -----------------------------------------------------------------------------

OFFLINE_SCRIPT = r'''
import json, sys, time
if __name__ == "__main__":
    from vllm import LLM, SamplingParams
    job = json.load(open(sys.argv[1]))
    llm = LLM(model=job["model"], **job["llm"])
    sps = [SamplingParams(max_tokens=1024, temperature=0.0, extra_args=x) for x in job["xargs"]]
    t = time.time()
    outs = llm.generate([{"prompt_token_ids": p} for p in job["prompts"]], sps, use_tqdm=False)
    json.dump({"tokens": [list(o.outputs[0].token_ids) for o in outs],
               "wall_s": time.time() - t}, open(sys.argv[2], "w"))
'''


def run_script(args, script: str, job: dict, name: str) -> dict:
    """Run `script` (vLLM's LLM needs a __main__) with the plugin on `job`; its JSON out."""
    d = tempfile.mkdtemp()
    path, job_path, out = (os.path.join(d, n) for n in ("run.py", "job.json", "out.json"))
    with open(path, "w") as f:
        f.write(script)
    with open(job_path, "w") as f:
        json.dump(job, f)
    logf = os.path.join(args.out, f"{name}.log")
    with open(logf, "w") as lf:
        p = subprocess.run([sys.executable, path, job_path, out], env=plugin_env(), cwd=ROOT,
                           stdout=lf, stderr=subprocess.STDOUT, timeout=600)
    if p.returncode != 0:
        raise RuntimeError(f"{name} failed:\n" + open(logf).read()[-4000:])
    with open(out) as f:
        r = json.load(f)
    shutil.rmtree(d, ignore_errors=True)
    return r


def run_offline(args, prompts, res: dict) -> None:
    n = min(64, len(prompts))
    xargs = [{**SERVE_CFG, "policy": POLICIES[i % len(POLICIES)]} for i in range(n)]
    log("offline: LLM.generate, float32")
    got = run_script(args, OFFLINE_SCRIPT, {
        "model": args.model, "prompts": prompts[:n], "xargs": xargs,
        "llm": {"dtype": "float32", "max_model_len": 1024, "max_num_seqs": 64,
                "gpu_memory_utilization": 0.3}}, "offline_float32")
    jobs = list(zip(prompts[:n], xargs))
    refs = {"core_batched": core_tokens(args.model, "float32", jobs, True),
            "core_alone": core_tokens(args.model, "float32", jobs, False)}
    out = {"prompts": n, "wall_s": got["wall_s"],
           "same_tokens": compare(got["tokens"], refs, [None] * n),
           "per_policy_alone": {p: sum(got["tokens"][i] == refs["core_alone"][i]
                                       for i in range(n) if xargs[i]["policy"] == p)
                                for p in POLICIES}}
    res["offline"] = out
    log(f"offline: {json.dumps(out)}")


# -- speed ---------------------------------------------------------------------------------

def shape_folder(root: str) -> str:
    """A folder with only the 8B shape's config.json (random weights, no tokenizer)."""
    from model_executor.config import llada_8b_config

    folder = os.path.join(root, "llada-8b-shape")
    os.makedirs(folder, exist_ok=True)
    cfg = llada_8b_config().to_dict()
    cfg.update({"architectures": ["LLaDAModelLM"], "model_type": "llada",
                "torch_dtype": "bfloat16"})
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump(cfg, f)
    return folder


SPEED_SCRIPT = r'''
import json, sys, time
if __name__ == "__main__":
    from vllm import LLM, SamplingParams
    job = json.load(open(sys.argv[1]))
    llm = LLM(model=job["model"], **job["llm"])
    out = []
    for b, pol in job["configs"]:
        sp = SamplingParams(max_tokens=job["G"], temperature=0.0,
                            extra_args={**job["xargs"], "policy": pol})
        for rep in range(2):
            t = time.time()
            outs = llm.generate([{"prompt_token_ids": p} for p in job["prompts"][:b]],
                                [sp] * b, use_tqdm=False)
            dt = time.time() - t
        n = sum(len(o.outputs[0].token_ids) for o in outs)
        out.append({"batch": b, "policy": pol, "tok_s": n / dt, "wall_s": dt, "tokens": n})
    json.dump({"runs": out, "pass_counts": llm.collective_rpc("elastic_pass_counts")},
              open(sys.argv[2], "w"))
'''


def run_speed(args, res: dict) -> None:
    import torch

    from model_executor.config import llada_8b_config
    from model_executor.llada import LLaDAModel
    from model_executor.tokenizer import config_special_ids
    from vllm_elastic.core import Engine, GenerationParams

    folder = shape_folder(tempfile.mkdtemp())
    G, P = 512, 128
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(0, 126000, (P,), generator=g).tolist() for _ in range(32)]
    xargs = {"gen_length": G, "block_length": 32, "threshold": 0.9, "stop_at_eos": False}
    configs = [(b, pol) for pol in args.speed_policies for b in args.speed_batches]
    runs = res.setdefault("speed", [])
    # The core, in this process.
    log("speed: the core (random 8B-shaped bf16 weights)")
    model = LLaDAModel.random(llada_8b_config(), torch.bfloat16, "cuda", seed=0)
    special = config_special_ids(folder)
    eng = Engine(model, special, max_batch_size=max(args.speed_batches), page_size=16,
                 max_request_tokens=P + G)
    core = {}
    for b, pol in configs:
        params = GenerationParams.from_dict({**xargs, "policy": pol})
        for rep in range(2):  # warm-up, then timed
            torch.cuda.synchronize()
            t = time.time()
            out = eng.generate(prompts[:b], params)
            torch.cuda.synchronize()
            dt = time.time() - t
        core[(b, pol)] = {"tok_s": sum(len(o.token_ids) for o in out) / dt, "wall_s": dt,
                          "tokens": sum(len(o.token_ids) for o in out)}
        res.setdefault("speed_core", []).append({"batch": b, "policy": pol, **core[(b, pol)]})
        log(f"speed core b={b} {pol}: {core[(b, pol)]}")
    counts_core = eng.runner.pass_counts()
    del eng, model
    torch.cuda.empty_cache()
    # The plugin: one LLM runs every configuration twice in a row (warm-up, timed).
    log("speed: the plugin (LLM.generate, --load-format dummy)")
    job = {"model": folder, "G": G, "xargs": xargs, "prompts": prompts, "configs": configs,
           "llm": {"dtype": "bfloat16", "load_format": "dummy", "skip_tokenizer_init": True,
                   "max_model_len": 1024, "max_num_seqs": max(args.speed_batches),
                   "block_size": 16, "gpu_memory_utilization": 0.85, "seed": 0}}
    plug = run_script(args, SPEED_SCRIPT, job, "speed_plugin")
    for r in plug["runs"]:
        c = core[(r["batch"], r["policy"])]
        runs.append({"batch": r["batch"], "policy": r["policy"], "G": G,
                     "plugin_tok_s": r["tok_s"], "core_tok_s": c["tok_s"],
                     "ratio": r["tok_s"] / c["tok_s"], "plugin_tokens": r["tokens"],
                     "core_tokens": c["tokens"]})
    res["speed_pass_counts"] = {"plugin": plug["pass_counts"], "core": counts_core}
    log(f"speed: {json.dumps(runs)}")


# -- table ---------------------------------------------------------------------------------

def table(res: dict) -> str:
    lines = []
    if res.get("serve"):
        lines += ["| server dtype | requests | kinds | tokens | wall s | = core (batch) | "
                  "= core (alone) | bad request | steps on /metrics | compute frac. |",
                  "|---|---|---|---|---|---|---|---|---|---|"]
        for s in res["serve"]:
            st = s.get("same_tokens", {})
            m = s["metrics"]
            lines.append(f"| {s['dtype']} | {s['requests']} | {', '.join(s['kinds'])} | "
                         f"{s['tokens']} | {s['wall_s']:.1f} | "
                         f"{st.get('core_batched', '-')}/{st.get('n', '-')} | "
                         f"{st.get('core_alone', '-')}/{st.get('n', '-')} | "
                         f"{s['bad_request'].get('status')} | "
                         f"{m.get('denoising_steps_total')} | "
                         f"{(m.get('compute_fraction') or 0):.3f} |")
    if res.get("offline"):
        o = res["offline"]
        st = o["same_tokens"]
        lines += ["", f"LLM.generate, {o['prompts']} dev prompts, float32: same tokens as the "
                  f"core in one batch {st['core_batched']}/{st['n']}, request by request "
                  f"{st['core_alone']}/{st['n']}; per policy (alone): {o['per_policy_alone']}"]
    if res.get("speed"):
        lines += ["", "| 8B shape, G | batch | policy | plugin tok/s | core tok/s | "
                  "plugin / core |", "|---|---|---|---|---|---|"]
        for r in res["speed"]:
            lines.append(f"| {r['G']} | {r['batch']} | {r['policy']} | "
                         f"{r['plugin_tok_s']:.1f} | {r['core_tok_s']:.1f} | "
                         f"{r['ratio']:.3f} |")
        lines.append(f"pass counts: {json.dumps(res.get('speed_pass_counts'))}")
    elif res.get("speed_core"):
        lines += ["", "8B shape, the core alone (the plugin's run failed): " + "; ".join(
            f"b={r['batch']} {r['policy']} {r['tok_s']:.1f} tok/s" for r in res["speed_core"])]
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default="out")
    ap.add_argument("--parts", default="serve_float32,speed,offline,serve_bfloat16",
                    help="in this order")
    ap.add_argument("--model", default=os.path.join(ROOT, ".models", "mini-llada-v1"))
    ap.add_argument("--tasks", default=os.path.join(ROOT, ".models", "dev.jsonl"))
    ap.add_argument("--speed-batches", type=int, nargs="+", default=[1, 32])
    ap.add_argument("--speed-policies", nargs="+", default=["elastic", "dual"])
    ap.add_argument("--budget-s", type=float, default=540)
    args = ap.parse_args()
    os.makedirs(args.out, exist_ok=True)
    import torch

    from model_executor.tokenizer import load_tokenizer, render_prompt

    res: dict = {"device": torch.cuda.get_device_name(), "torch": torch.__version__,
                 "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
                 "argv": sys.argv[1:], "errors": {}}
    try:
        import vllm

        res["vllm"] = vllm.__version__
    except ImportError as e:
        res["vllm"] = f"not importable: {e}"
    items = [json.loads(line) for line in open(args.tasks)]
    by_task: dict[str, list[dict]] = {}
    for it in items:
        by_task.setdefault(it["task"], []).append(it)
    items = [it for group in zip(*by_task.values()) for it in group]
    tok = load_tokenizer(args.model)
    prompts = [render_prompt(tok, {"messages": it["messages"]}) for it in items[:64]]
    run = {"serve_float32": lambda: run_serve(args, items, prompts, "float32", res),
           "serve_bfloat16": lambda: run_serve(args, items, prompts, "bfloat16", res),
           "offline": lambda: run_offline(args, prompts, res),
           "speed": lambda: run_speed(args, res)}
    steps = [(name, run[name]) for name in args.parts.split(",")]
    for name, fn in steps:
        if over_budget(args):
            log(f"budget spent: skipping {name}")
            res["errors"][name] = "skipped (budget)"
            continue
        try:
            fn()
        except Exception as e:  # noqa: BLE001 - record, go on with the next part
            log(f"{name} FAILED: {e!r}")
            res["errors"][name] = repr(e)[-3000:]
        with open(os.path.join(args.out, "vllm_gpu.json"), "w") as f:
            json.dump(res, f, indent=1, default=str)
    print(table(res), flush=True)
    print("errors:", json.dumps(res["errors"])[:3000], flush=True)


if __name__ == "__main__":
    main()
