"""`vllm-elastic serve` under concurrent streaming load, hang-ups, a small KV pool, hostile input.

Starts the server on the loopback (mini model, float32), then N clients send M requests
each, in order: chat and completions, streaming or not, every cache policy, random prompts,
canvas lengths, thresholds, temperatures and max_tokens; `--disconnects` of them hang up
early (streams closed after one or two chunks, some plain requests closed after a moment);
the hostile list (tests/harness/hostile.py) is mixed in `--hostile-rounds` times. The KV
pool is `--pool-fraction` of what the load needs (concurrent requests x blocks per request).
Afterwards every answer is compared with the same request run alone on the engine core.

    python benchmarks/load_test.py --clients 64 --requests 200 --disconnects 20 \\
        --pool-fraction 0.10 --out benchmarks/results/load_test_cpu.json

Prints the table (markdown), the hostile cases' answers and every problem found; exits 1
unless the run was clean (0 lost, 0 wrong, hostile cases refused right, blocks back to
idle, server up).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.harness import load as load_mod  # noqa: E402
from tests.harness.hostile import hostile_cases  # noqa: E402
from tests.harness.reference import references  # noqa: E402
from tests.harness.report import hostile_table, summarize, table  # noqa: E402
from tests.harness.server import Server, ServerConfig  # noqa: E402
from tests.harness.workload import WorkloadConfig, make_jobs, make_schedule  # noqa: E402

BLOCK_SIZE = 32
SERVER_CFG = {"gen_length": 64, "block_length": 32}


def _args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default=str(ROOT.parent / "shared" / "models" / "mini-llada-v1"))
    p.add_argument("--tasks", default=str(ROOT.parent / "shared" / "data" / "mini-tasks"
                                          / "dev.jsonl"))
    p.add_argument("--clients", type=int, default=64)
    p.add_argument("--requests", type=int, default=200, help="requests per client")
    p.add_argument("--disconnects", type=int, default=20)
    p.add_argument("--pool-fraction", type=float, default=0.10)
    p.add_argument("--jobs", type=int, default=192,
                   help="distinct (prompt, parameters) jobs the requests draw from")
    p.add_argument("--gen-lengths", default="32,64")
    p.add_argument("--hostile-rounds", type=int, default=1)
    p.add_argument("--budget-s", type=float, default=None,
                   help="clients stop starting new requests after this many seconds")
    p.add_argument("--request-timeout", type=float, default=900.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--log", default=None, help="server log (default: a temp file)")
    p.add_argument("--out", default=None, help="raw results JSON")
    return p.parse_args()


def main() -> int:
    args = _args()
    from model_executor.tokenizer import load_tokenizer

    rng = random.Random(args.seed)
    tok = load_tokenizer(args.model)
    items = [json.loads(line) for line in open(args.tasks)]
    gens = tuple(int(g) for g in args.gen_lengths.split(","))
    wl = WorkloadConfig(clients=args.clients, requests_per_client=args.requests,
                        disconnects=args.disconnects, num_jobs=args.jobs, gen_lengths=gens,
                        seed=args.seed)
    jobs = make_jobs(items, tok, wl, rng)
    schedule = make_schedule(jobs, wl, rng)
    pool = load_mod.pool_for_load(args.clients, max(len(j.prompt) for j in jobs), max(gens),
                                  BLOCK_SIZE, args.pool_fraction)
    cases = hostile_cases("mini-llada", pool.max_model_len, SERVER_CFG["gen_length"])
    mixed = load_mod.mix_hostile(schedule, cases, args.hostile_rounds, rng)
    cfg = ServerConfig(args.model, elastic=SERVER_CFG, max_model_len=pool.max_model_len,
                       block_size=BLOCK_SIZE, max_num_seqs=args.clients,
                       num_blocks=pool.num_blocks, dev_mode=False)
    log = args.log or tempfile.mktemp(prefix="load_test_server_", suffix=".log")
    print(f"server log: {log}; pool {pool}", file=sys.stderr)
    deadline = None if args.budget_s is None else time.monotonic() + args.budget_s
    with Server(cfg, log) as server:
        threads = server.worker_threads()
        print(f"server up in {server.startup_s:.0f} s (worker: {threads} threads)",
              file=sys.stderr)
        run = asyncio.run(load_mod.run_load(server, mixed, "mini-llada", pool,
                                            SERVER_CFG["gen_length"],
                                            request_timeout=args.request_timeout,
                                            deadline=deadline))
    print(f"load done in {run.wall_s:.0f} s; computing core references", file=sys.stderr)

    import torch

    from vllm_elastic.core import Engine

    engine = Engine.from_pretrained(args.model, dtype=torch.float32, max_batch_size=1,
                                    max_request_tokens=pool.max_model_len)
    sent_jobs = [spec.job for spec, _ in run.good]
    t0 = time.monotonic()
    refs = references(engine, sent_jobs, SERVER_CFG, threads)
    ref_s = time.monotonic() - t0
    verdicts = load_mod.judge_all(run, refs)
    s = summarize(run, verdicts, pool)
    planned = sum(len(row) for row in mixed)
    title = {"clients x requests each": f"{args.clients} x {args.requests} "
                                        f"(+ {len(cases)} hostile x {args.hostile_rounds})",
             "planned / not sent (time budget)": f"{planned} / {planned - s.sent}"}
    print(table(s, title))
    print()
    print(hostile_table(run))
    for p in s.problems:
        print("PROBLEM:", p)
    print(f"core references: {len(refs)} jobs in {ref_s:.0f} s", file=sys.stderr)
    if args.out:
        Path(args.out).write_text(json.dumps({
            "args": vars(args), "summary": {k: v for k, v in asdict(s).items()},
            "hostile": [{"case": c.name, "by": c.by, "status": o.status, "message": o.error}
                        for c, o in run.hostile],
            "verdicts": [{"index": sp.index, "client": sp.client, "endpoint": sp.endpoint,
                          "stream": sp.stream, "max_tokens": sp.max_tokens,
                          "xargs": sp.job.xargs_dict, "temperature": sp.job.temperature,
                          "disconnect_after": sp.disconnect_after, "verdict": v, "why": w,
                          "latency_s": o.latency_s, "ttft_s": o.ttft_s, "status": o.status,
                          "prompt_len": len(sp.job.prompt), "token_ids": o.token_ids,
                          "core_token_ids": refs[sp.job.key()].token_ids,
                          "finish_reason": o.finish_reason}
                         for sp, o, v, w in verdicts]}, indent=1))
    return 0 if s.clean else 1


if __name__ == "__main__":
    sys.exit(main())
