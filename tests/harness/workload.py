"""The load test's good requests: what each one asks for and which client sends it when.

A `Job` is what decides a request's tokens (prompt ids, `vllm_xargs`, temperature, seed);
a `RequestSpec` is one HTTP request of a job: endpoint (chat with the job's messages, or
completions with the same prompt ids), streaming or not, `max_tokens`, and whether its
client hangs up early. Several requests share a job, so one engine-core reference per job
checks every answer, whatever endpoint, stream mode or batch it was served in.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass, field
from typing import Any

from vllm_elastic.core.params import POLICY_NAMES

# A chat turn full of what tokenizers and JSON encoders trip over (served, not refused).
UNICODE_MESSAGE = ("Ünïcödé ✓ 日本語 🚀 Ωμέγα — tab\there, bell\x07, NUL\x00, ESC\x1b[31m, "
                   "RTL \u202eoverride\u202c, zero\u200bwidth. What is 2 + 3?")
# The completions endpoint's OpenAI default max_tokens (vLLM keeps it); chat has none.
COMPLETIONS_DEFAULT_MAX_TOKENS = 16


@dataclass(frozen=True)
class Job:
    """A request's content: everything its tokens depend on."""

    prompt: tuple[int, ...]              # prompt ids (chat: the rendered chat template)
    messages: tuple[tuple[str, str], ...]  # (role, content): the chat the prompt renders
    xargs: tuple[tuple[str, Any], ...]   # vllm_xargs, sorted
    temperature: float
    seed: int | None

    @property
    def xargs_dict(self) -> dict[str, Any]:
        return dict(self.xargs)

    @property
    def messages_list(self) -> list[dict[str, str]]:
        return [{"role": r, "content": c} for r, c in self.messages]

    def key(self) -> str:
        return json.dumps([list(self.prompt), list(self.xargs), self.temperature, self.seed])


@dataclass
class RequestSpec:
    """One good HTTP request of a job."""

    index: int
    client: int
    job: Job
    endpoint: str                   # "chat" | "completion"
    stream: bool
    max_tokens: int | None          # None: the endpoint's default
    disconnect_after: int | None = None  # hang up after this many chunks (stream) / 0: at once
    disconnect_delay_s: float = 0.0  # non-streaming hang-up: close after this long

    @property
    def token_cap(self) -> int | None:
        """How many of the canvas' tokens the server may emit for this request."""
        if self.max_tokens is not None:
            return self.max_tokens
        return COMPLETIONS_DEFAULT_MAX_TOKENS if self.endpoint == "completion" else None


@dataclass
class WorkloadConfig:
    clients: int
    requests_per_client: int
    disconnects: int
    num_jobs: int
    gen_lengths: tuple[int, ...] = (32, 64)
    thresholds: tuple[float, ...] = (0.9, 0.7)
    sampled_share: float = 0.25     # share of jobs at temperature > 0 (seeded Gumbel noise)
    stream_share: float = 0.5
    seed: int = 0
    policies: tuple[str, ...] = field(default=POLICY_NAMES)


def make_jobs(items: list[dict[str, Any]], tokenizer: Any, cfg: WorkloadConfig,
              rng: random.Random) -> list[Job]:
    """`cfg.num_jobs` jobs over the dev chats: every policy in turn, random lengths and
    decoding parameters; the last one is the unicode / control-character chat."""
    from model_executor.tokenizer import render_prompt

    jobs = []
    for i in range(cfg.num_jobs):
        if i == cfg.num_jobs - 1:
            messages = [{"role": "user", "content": UNICODE_MESSAGE}]
        else:
            messages = items[rng.randrange(len(items))]["messages"]
        xargs: dict[str, Any] = {"policy": cfg.policies[i % len(cfg.policies)],
                                 "gen_length": rng.choice(cfg.gen_lengths)}
        threshold = rng.choice(cfg.thresholds)
        if threshold != 0.9:
            xargs["threshold"] = threshold
        sampled = rng.random() < cfg.sampled_share
        temperature = round(rng.uniform(0.3, 1.0), 2) if sampled else 0.0
        seed = rng.randrange(1000) if sampled else None
        prompt = render_prompt(tokenizer, {"messages": messages})
        jobs.append(Job(tuple(prompt), tuple((m["role"], m["content"]) for m in messages),
                        tuple(sorted(xargs.items())), temperature, seed))
    return jobs


def make_schedule(jobs: list[Job], cfg: WorkloadConfig,
                  rng: random.Random) -> list[list[RequestSpec]]:
    """Per client, the good requests it sends in order; `cfg.disconnects` of them hang up
    early (mostly streams closed after one or two chunks, some non-streaming requests
    closed after a moment)."""
    schedule: list[list[RequestSpec]] = []
    n = 0
    for c in range(cfg.clients):
        row = []
        for _ in range(cfg.requests_per_client):
            job = rng.choice(jobs)
            endpoint = rng.choice(("chat", "completion"))
            stream = rng.random() < cfg.stream_share
            gen = job.xargs_dict["gen_length"]
            r = rng.random()
            if r < 0.3:
                max_tokens = None
            elif r < 0.45:
                max_tokens = rng.randint(1, 8)
            else:
                max_tokens = rng.randint(gen // 2, 2 * gen)
            row.append(RequestSpec(n, c, job, endpoint, stream, max_tokens))
            n += 1
        schedule.append(row)
    flat = [s for row in schedule for s in row]
    for s in rng.sample(flat, min(cfg.disconnects, len(flat))):
        # A hang-up must find the request still running: the whole canvas, no early cap.
        s.max_tokens = None if s.endpoint == "chat" else s.job.xargs_dict["gen_length"]
        if rng.random() < 0.75:
            s.stream = True
            s.disconnect_after = rng.choice((1, 2))
        else:
            s.stream = False
            s.disconnect_after = 0
            s.disconnect_delay_s = round(rng.uniform(0.2, 1.0), 2)
    return schedule
