"""The served engine under load: 16 clients x 3 requests, 4 hang-ups, a KV pool at ~25% of
need, the hostile list mixed in; nothing lost, nothing wrong, blocks back, server up.

The CI-sized run of benchmarks/load_test.py (same harness, tests/harness/), on the session's
server (`served` in conftest.py). Every answer is compared with its job run alone on the
engine core; the hostile requests must each get a 4xx naming the problem.
"""

from __future__ import annotations

import asyncio
import random

import pytest

from tests.harness.hostile import hostile_cases
from tests.harness.load import judge_all, mix_hostile, run_load
from tests.harness.reference import references
from tests.harness.report import hostile_table, summarize, table
from tests.harness.workload import WorkloadConfig, make_jobs, make_schedule

pytestmark = pytest.mark.vllm

WORKLOAD = WorkloadConfig(clients=16, requests_per_client=3, disconnects=4, num_jobs=16,
                          gen_lengths=(32, 64), seed=0)


@pytest.fixture(scope="module")
def load(served, engine, dev_items, tokenizer):
    rng = random.Random(WORKLOAD.seed)
    jobs = make_jobs(dev_items, tokenizer, WORKLOAD, rng)
    schedule = make_schedule(jobs, WORKLOAD, rng)
    cases = hostile_cases(served.model, served.pool.max_model_len, served.cfg["gen_length"])
    mixed = mix_hostile(schedule, cases, 1, rng)
    run = asyncio.run(run_load(served.server, mixed, served.model, served.pool,
                               served.cfg["gen_length"], request_timeout=300))
    refs = references(engine, [spec.job for spec, _ in run.good], served.cfg,
                      served.server.worker_threads())
    verdicts = judge_all(run, refs)
    summary = summarize(run, verdicts, served.pool)
    print("\n" + table(summary) + "\n\n" + hostile_table(run))
    return run, verdicts, summary, refs


def test_pool_is_a_quarter_of_need(served, load):
    run, _, s, _ = load
    assert 0.2 <= served.pool.fraction <= 0.3
    # the pool, not the clients, limited the load: requests waited for blocks
    assert run.peak["vllm:num_requests_waiting"] > 0
    assert run.peak["vllm:num_requests_running"] < WORKLOAD.clients


def test_nothing_lost_nothing_wrong(load):
    _, verdicts, s, _ = load
    bad = [p for p in s.problems if p.startswith(("lost", "wrong"))]
    assert not bad, "\n".join(bad)
    assert s.good == WORKLOAD.clients * WORKLOAD.requests_per_client
    assert s.completed + s.disconnected == s.good


def test_load_covers_the_mix(load):
    """The run had what the checks above need: every policy, both endpoints streamed and
    plain, sampling, a max_tokens cut, an EOS stop, the completions default max_tokens, the
    unicode chat, and one job answered both streamed and plain (so equal tokens had to give
    equal text)."""
    _, verdicts, _, refs = load
    done = [(spec, out) for spec, out, v, _ in verdicts if v == "completed"]
    assert {spec.job.xargs_dict["policy"] for spec, _ in done} == set(WORKLOAD.policies)
    assert {(spec.endpoint, spec.stream) for spec, _ in done} == {
        (e, st) for e in ("chat", "completion") for st in (False, True)}
    assert any(spec.job.temperature > 0 for spec, _ in done)
    assert any(out.finish_reason == "length" and spec.token_cap is not None
               and spec.token_cap < len(refs[spec.job.key()].token_ids) for spec, out in done)
    assert any(out.finish_reason == "stop" for _, out in done)
    assert any(spec.endpoint == "completion" and spec.max_tokens is None  # OpenAI default 16
               for spec, _ in done)
    modes: dict[str, set[bool]] = {}
    for spec, _ in done:
        modes.setdefault(spec.job.key(), set()).add(spec.stream)
    assert any(len(m) == 2 for m in modes.values())
    assert any(spec.job.messages_list[0]["content"].startswith("Ünïcödé") for spec, _ in done)


def test_hostile_requests_refused(load):
    run, _, s, _ = load
    bad = [p for p in s.problems if p.startswith("hostile")]
    assert not bad, "\n".join(bad)
    assert s.refused == len(run.hostile) > 0


def test_hangups_abort_and_blocks_return(load):
    """Clients hung up mid-stream; afterwards no block is in use, nothing runs or waits,
    and a request needing every block of the pool is served."""
    _, _, s, _ = load
    assert s.disconnected >= 1
    assert 1 <= s.aborted <= s.disconnected  # vLLM aborted the hung-up requests
    assert s.idle_error is None
    assert (s.blocks_after, s.running_after, s.waiting_after) == (0, 0, 0)
    assert s.whole_pool_served


def test_server_alive(load, served):
    _, _, s, _ = load
    assert s.alive and served.server.healthy()
