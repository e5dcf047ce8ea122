"""Engine-core references for served answers: each job run alone on `vllm_elastic.core`.

The parameters come from the plugin's own merge (`request_params` over `server_defaults`)
applied to the SamplingParams vLLM builds from the request (temperature, seed,
`vllm_xargs`), so the reference decodes exactly what the server was asked to decode.

Each job runs alone, with the server worker's torch thread count: on the CPU a GEMM's
rounding depends on how many threads split it, and for a few rows also on the number of
rows (multi-threaded only), so with another thread count SPA-Cache's row selection (a
top-k over proxy cosines, which flips on last-bit differences) can pick other rows. With
the worker's thread count (one on a 2-core machine: vLLM keeps a core for its frontend)
the core's tokens do not depend on the batch.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from types import SimpleNamespace
from typing import Any

import torch

from vllm_elastic.core import Engine, GenerationParams
from vllm_elastic.core.engine import GenerationResult
from vllm_elastic.vllm_plugin.request_params import request_params, server_defaults

from .workload import Job


def job_params(job: Job, server_cfg: dict[str, Any]) -> GenerationParams:
    """The GenerationParams the plugin derives for this job on a server with this config."""
    from vllm import SamplingParams

    sp = SamplingParams(temperature=job.temperature, seed=job.seed, extra_args=job.xargs_dict)
    base = server_defaults(SimpleNamespace(additional_config={"elastic": server_cfg}))
    return request_params(sp, base)


@contextmanager
def torch_threads(n: int | None) -> Iterator[None]:
    """torch's intra-op thread count set to n inside the block (None: unchanged)."""
    before = torch.get_num_threads()
    if n is not None:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def references(engine: Engine, jobs: list[Job], server_cfg: dict[str, Any],
               threads: int | None) -> dict[str, GenerationResult]:
    """{job key: the core's result for that job alone}, run with `threads` torch threads
    (the server worker's: `Server.worker_threads()`)."""
    out: dict[str, GenerationResult] = {}
    with torch_threads(threads):
        for job in jobs:
            if job.key() not in out:
                out[job.key()] = engine.generate([list(job.prompt)],
                                                 [job_params(job, server_cfg)])[0]
    return out
