"""A load run against a served engine: concurrent clients, hang-ups, hostile requests mixed in.

`pool_for_load()` sizes the KV pool as a fraction of what the load needs; `mix_hostile()`
spreads the hostile cases over the clients' schedules; `run_load()` runs every client
(asyncio, one httpx client each, requests in order), samples /metrics meanwhile, then
waits for the server to go idle, checks that a request needing the whole pool is still
served and that /health answers; `judge()` compares each answer with its engine-core
reference.
"""

from __future__ import annotations

import asyncio
import json
import math
import random
import time
from dataclasses import dataclass, field
from typing import Any

import httpx

from .client import Outcome, send_good, send_raw
from .hostile import HostileCase
from .server import Server
from .workload import RequestSpec

Item = RequestSpec | HostileCase


@dataclass(frozen=True)
class PoolPlan:
    """The KV pool for a load: `need` blocks would hold every concurrent request at once."""

    need: int            # max concurrent requests x blocks per request
    usable: int          # blocks given to requests (fraction x need, at least one request)
    num_blocks: int      # --num-gpu-blocks-override (vLLM keeps one block aside)
    max_model_len: int   # usable x block_size (vLLM requires a request of it to fit)

    @property
    def fraction(self) -> float:
        return self.usable / self.need


def pool_for_load(concurrency: int, longest_prompt: int, gen_length: int, block_size: int,
                  fraction: float) -> PoolPlan:
    per_request = math.ceil((longest_prompt + gen_length) / block_size)
    need = concurrency * per_request
    usable = max(math.ceil(fraction * need), per_request)
    return PoolPlan(need, usable, usable + 1, usable * block_size)


def mix_hostile(schedule: list[list[RequestSpec]], cases: list[HostileCase], rounds: int,
                rng: random.Random) -> list[list[Item]]:
    """Each client's items: its good requests with `rounds` copies of the hostile list
    inserted at random clients and positions."""
    mixed: list[list[Item]] = [list(row) for row in schedule]
    for _ in range(rounds):
        for case in cases:
            row = mixed[rng.randrange(len(mixed))]
            row.insert(rng.randrange(len(row) + 1), case)
    return mixed


@dataclass
class LoadRun:
    good: list[tuple[RequestSpec, Outcome]] = field(default_factory=list)
    hostile: list[tuple[HostileCase, Outcome]] = field(default_factory=list)
    wall_s: float = 0.0
    rss_before: int = 0
    rss_after: int = 0
    peak: dict[str, float] = field(default_factory=dict)     # during the load
    before: dict[str, float] = field(default_factory=dict)   # /metrics before
    idle: dict[str, float] = field(default_factory=dict)     # /metrics once idle
    idle_error: str | None = None
    aborted: int = 0                    # requests vLLM aborted (client gone) during the run
    whole_pool: Outcome | None = None   # a request needing every usable block
    alive: bool = False


async def _client(base: str, items: list[Item], model: str, timeout: float,
                  run: LoadRun, deadline: float | None) -> None:
    async with httpx.AsyncClient(base_url=base, timeout=timeout) as client:
        for item in items:
            if deadline is not None and time.monotonic() > deadline:
                return
            if isinstance(item, HostileCase):
                out = await send_raw(client, item.path, item.body, item.content_type)
                run.hostile.append((item, out))
            else:
                run.good.append((item, await send_good(client, item, model)))


async def _sample(server: Server, peak: dict[str, float], stop: asyncio.Event) -> None:
    keys = ("vllm:num_requests_running", "vllm:num_requests_waiting",
            "vllm:kv_cache_usage_perc")
    while not stop.is_set():
        try:
            m = await asyncio.to_thread(server.metrics)
            for k in keys:
                peak[k] = max(peak.get(k, 0.0), m.get(k, 0.0))
        except OSError:
            pass
        try:
            await asyncio.wait_for(stop.wait(), 0.5)
        except asyncio.TimeoutError:
            pass


async def _whole_pool(server: Server, model: str, pool: PoolPlan, gen_length: int,
                      timeout: float) -> Outcome:
    # prompt + canvas = max_model_len - 1 positions (the plugin's bound): every usable block.
    prompt = [5] * (pool.max_model_len - 1 - gen_length)
    body = {"model": model, "prompt": prompt, "max_tokens": 1, "temperature": 0,
            "vllm_xargs": {"policy": "dual", "gen_length": gen_length}}
    async with httpx.AsyncClient(base_url=server.base, timeout=timeout) as client:
        return await send_raw(client, "/v1/completions", json.dumps(body).encode())


async def run_load(server: Server, schedule: list[list[Item]], model: str, pool: PoolPlan,
                   gen_length: int, request_timeout: float = 600.0,
                   idle_timeout: float = 120.0, deadline: float | None = None) -> LoadRun:
    """Run every client's items; afterwards wait for idle, send the whole-pool request,
    read memory and health. `deadline` (time.monotonic()): no new request starts after it."""
    run = LoadRun(rss_before=server.rss_bytes(), before=server.metrics())
    aborted_before = server.aborted_total()
    stop = asyncio.Event()
    sampler = asyncio.create_task(_sample(server, run.peak, stop))
    t0 = time.monotonic()
    await asyncio.gather(*(_client(server.base, row, model, request_timeout, run, deadline)
                           for row in schedule))
    run.wall_s = time.monotonic() - t0
    stop.set()
    await sampler
    try:
        run.idle = await asyncio.to_thread(server.wait_idle, idle_timeout)
    except TimeoutError as e:
        run.idle_error = str(e)
        run.idle = server.metrics()
    run.aborted = server.aborted_total() - aborted_before
    run.whole_pool = await _whole_pool(server, model, pool, gen_length, idle_timeout)
    run.rss_after = server.rss_bytes()
    run.alive = server.healthy()
    return run


# -- judging ------------------------------------------------------------------------------

def judge(spec: RequestSpec, out: Outcome, ref: Any) -> tuple[str, str]:
    """(verdict, why) for a good request: "completed", "disconnected", "lost" or "wrong"."""
    cap = spec.token_cap
    want = list(ref.token_ids[:cap]) if cap is not None else list(ref.token_ids)
    if out.disconnected:
        if out.token_ids != want[:len(out.token_ids)]:
            return "wrong", f"tokens before the hang-up {out.token_ids} are not a prefix of {want}"
        return "disconnected", ""
    if out.status != 200 or out.error is not None:
        return "lost", f"status {out.status}: {out.error}"
    if out.finish_reason is None:
        return "lost", "no finish_reason"
    if out.prompt_ids != list(spec.job.prompt):
        return "wrong", f"prompt ids {out.prompt_ids} differ from the chat template's"
    if out.token_ids != want:
        return "wrong", f"tokens {out.token_ids} != core {want}"
    want_finish = "length" if cap is not None and cap < len(ref.token_ids) \
        else ref.finish_reason
    if out.finish_reason != want_finish:
        return "wrong", f"finish_reason {out.finish_reason} != {want_finish}"
    u = out.usage or {}
    if u.get("prompt_tokens") != len(spec.job.prompt) or \
            u.get("completion_tokens") != len(want) or \
            u.get("total_tokens") != len(spec.job.prompt) + len(want):
        return "wrong", f"usage {u} (prompt {len(spec.job.prompt)}, completion {len(want)})"
    return "completed", ""


def judge_all(run: LoadRun, refs: dict[str, Any]) -> list[tuple[RequestSpec, Outcome, str, str]]:
    """Every good request's verdict; answers with the same tokens must also have the same
    text (streamed or not, chat or completions)."""
    rows = []
    texts: dict[tuple[int, ...], str] = {}
    for spec, out in run.good:
        verdict, why = judge(spec, out, refs[spec.job.key()])
        if verdict == "completed":
            seen = texts.setdefault(tuple(out.token_ids), out.text)
            if seen != out.text:
                verdict, why = "wrong", f"text {out.text!r} != {seen!r} for the same tokens"
        rows.append((spec, out, verdict, why))
    return rows
