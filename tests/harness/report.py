"""The load test's numbers (`summarize`) and their markdown tables (`table`, `hostile_table`)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from .client import Outcome
from .hostile import HostileCase
from .load import LoadRun, PoolPlan
from .workload import RequestSpec


def percentile(values: list[float], q: float) -> float | None:
    """The q-th percentile (nearest rank) of values; None when there are none."""
    if not values:
        return None
    v = sorted(values)
    return v[min(len(v) - 1, max(0, math.ceil(q / 100 * len(v)) - 1))]


@dataclass
class Summary:
    sent: int
    good: int
    hostile: int
    completed: int
    refused: int
    disconnected: int
    hung_up_unfinished: int   # of those, before their answer had finished
    aborted: int              # requests vLLM aborted because their client went away
    lost: int
    wrong: int
    bad_refusals: int
    latency_p50: float | None
    latency_p99: float | None
    ttft_p50: float | None
    ttft_p99: float | None
    wall_s: float
    requests_per_s: float
    tokens_per_s: float
    peak: dict[str, float]
    preemptions: float
    blocks_after: float
    running_after: float
    waiting_after: float
    idle_error: str | None
    whole_pool_served: bool
    rss_before_mib: float
    rss_after_mib: float
    alive: bool
    pool: PoolPlan
    problems: list[str] = field(default_factory=list)  # every lost / wrong / bad refusal

    @property
    def clean(self) -> bool:
        """0 lost, 0 wrong, every hostile case refused right, blocks back, server up."""
        return (self.lost == 0 and self.wrong == 0 and self.bad_refusals == 0
                and self.blocks_after == 0 and self.running_after == 0
                and self.waiting_after == 0 and self.whole_pool_served and self.alive)


def summarize(run: LoadRun, verdicts: list[tuple[RequestSpec, Outcome, str, str]],
              pool: PoolPlan) -> Summary:
    count = {k: 0 for k in ("completed", "disconnected", "lost", "wrong")}
    problems = []
    lat, ttft, tokens = [], [], 0
    for spec, out, verdict, why in verdicts:
        count[verdict] += 1
        if verdict in ("lost", "wrong"):
            problems.append(f"{verdict} #{spec.index} ({spec.endpoint}, stream={spec.stream}, "
                            f"{spec.job.xargs_dict}): {why}")
        if verdict == "completed":
            lat.append(out.latency_s)
            tokens += len(out.token_ids)
            if out.ttft_s is not None:
                ttft.append(out.ttft_s)
    bad = [(c, c.check(o)) for c, o in run.hostile]
    problems += [f"hostile {c.name!r}: {why}" for c, why in bad if why is not None]
    wp = run.whole_pool
    whole = wp is not None and wp.status == 200 and wp.error is None
    if not whole:
        problems.append(f"whole-pool request not served: {wp.status if wp else None} "
                        f"{wp.error if wp else ''}")
    if run.idle_error:
        problems.append(run.idle_error)
    usage = run.idle.get("vllm:kv_cache_usage_perc", 1.0)
    return Summary(
        sent=len(run.good) + len(run.hostile), good=len(run.good), hostile=len(run.hostile),
        completed=count["completed"], refused=sum(why is None for _, why in bad),
        disconnected=count["disconnected"],
        hung_up_unfinished=sum(v == "disconnected" and o.finish_reason is None
                               for _, o, v, _ in verdicts),
        aborted=run.aborted, lost=count["lost"], wrong=count["wrong"],
        bad_refusals=sum(why is not None for _, why in bad),
        latency_p50=percentile(lat, 50), latency_p99=percentile(lat, 99),
        ttft_p50=percentile(ttft, 50), ttft_p99=percentile(ttft, 99),
        wall_s=run.wall_s, requests_per_s=count["completed"] / max(run.wall_s, 1e-9),
        tokens_per_s=tokens / max(run.wall_s, 1e-9), peak=dict(run.peak),
        preemptions=run.idle.get("vllm:num_preemptions_total", 0.0)
        - run.before.get("vllm:num_preemptions_total", 0.0),
        blocks_after=round(usage * pool.usable, 3),
        running_after=run.idle.get("vllm:num_requests_running", -1),
        waiting_after=run.idle.get("vllm:num_requests_waiting", -1),
        idle_error=run.idle_error, whole_pool_served=whole,
        rss_before_mib=run.rss_before / 2 ** 20, rss_after_mib=run.rss_after / 2 ** 20,
        alive=run.alive, pool=pool, problems=problems)


def _s(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.2f} s"


def table(s: Summary, title: dict[str, Any] | None = None) -> str:
    """The run as a two-column markdown table."""
    rows = list((title or {}).items()) + [
        ("requests sent (good + hostile)", f"{s.sent} ({s.good} + {s.hostile})"),
        ("completed", s.completed),
        ("refused (hostile, 4xx naming the problem)", s.refused),
        ("disconnected (client hung up on purpose)",
         f"{s.disconnected} ({s.hung_up_unfinished} before the answer finished; vLLM "
         f"aborted {s.aborted:.0f})"),
        ("lost", s.lost),
        ("wrong answers (vs the core, request alone)", s.wrong),
        ("hostile cases not refused right", s.bad_refusals),
        ("latency p50 / p99 (completed)", f"{_s(s.latency_p50)} / {_s(s.latency_p99)}"),
        ("first streamed token p50 / p99", f"{_s(s.ttft_p50)} / {_s(s.ttft_p99)}"),
        ("load wall time", f"{s.wall_s:.1f} s"),
        ("throughput", f"{s.requests_per_s:.2f} req/s, {s.tokens_per_s:.1f} tokens/s"),
        ("KV pool", f"{s.pool.usable} blocks = {100 * s.pool.fraction:.0f}% of need "
                    f"{s.pool.need}"),
        ("peak running / waiting / KV usage",
         f"{s.peak.get('vllm:num_requests_running', 0):.0f} / "
         f"{s.peak.get('vllm:num_requests_waiting', 0):.0f} / "
         f"{100 * s.peak.get('vllm:kv_cache_usage_perc', 0):.0f}%"),
        ("preemptions", f"{s.preemptions:.0f}"),
        ("after the load: KV blocks in use / running / waiting",
         f"{s.blocks_after:g} / {s.running_after:.0f} / {s.waiting_after:.0f} (idle: 0 / 0 / 0)"),
        ("a request needing the whole pool served", "yes" if s.whole_pool_served else "NO"),
        ("server RSS before / after", f"{s.rss_before_mib:.0f} MiB / {s.rss_after_mib:.0f} MiB"),
        ("server alive at the end (/health 200)", "yes" if s.alive else "NO"),
    ]
    lines = ["| metric | value |", "|---|---|"]
    lines += [f"| {k} | {v} |" for k, v in rows]
    return "\n".join(lines)


def hostile_table(run: LoadRun) -> str:
    """One row per hostile case (its first send): who answered, status, message."""
    seen: dict[str, tuple[HostileCase, Outcome]] = {}
    for case, out in run.hostile:
        seen.setdefault(case.name, (case, out))
    lines = ["| case | answered by | status | message (start) |", "|---|---|---|---|"]
    for case, out in seen.values():
        msg = (out.error or out.text or "").replace("\n", " ").replace("|", "\\|")[:110]
        status = f"{out.status} (stream error event)" if case.stream_error else out.status
        ok = "" if case.check(out) is None else " **WRONG**"
        lines.append(f"| {case.name} | {case.by} | {status}{ok} | {msg} |")
    return "\n".join(lines)
