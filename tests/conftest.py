"""Shared fixtures: the mini model, its dev prompts, one engine and one server per session."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parent.parent
MINI_MODEL = Path(os.environ.get("VLLM_ELASTIC_MINI_MODEL",
                                 ROOT.parent / "shared" / "models" / "mini-llada-v1"))
DEV_TASKS = Path(os.environ.get("VLLM_ELASTIC_DEV_TASKS",
                                ROOT.parent / "shared" / "data" / "mini-tasks" / "dev.jsonl"))


def pytest_configure(config):
    if not MINI_MODEL.is_dir():
        raise pytest.UsageError(f"mini model not found at {MINI_MODEL} "
                                "(set VLLM_ELASTIC_MINI_MODEL)")


@pytest.fixture(scope="session")
def model_dir() -> str:
    return str(MINI_MODEL)


@pytest.fixture(scope="session")
def tokenizer(model_dir):
    from model_executor.tokenizer import load_tokenizer

    return load_tokenizer(model_dir)


@pytest.fixture(scope="session")
def dev_items() -> list[dict]:
    with open(DEV_TASKS) as f:
        return [json.loads(line) for line in f]


@pytest.fixture(scope="session")
def dev_prompts(dev_items, tokenizer) -> list[list[int]]:
    """Chat-rendered prompt ids of the dev tasks, interleaving the three task kinds."""
    from model_executor.tokenizer import render_prompt

    by_task: dict[str, list[dict]] = {}
    for it in dev_items:
        by_task.setdefault(it["task"], []).append(it)
    mixed = [it for group in zip(*by_task.values()) for it in group]
    return [render_prompt(tokenizer, {"messages": it["messages"]}) for it in mixed]


@pytest.fixture(scope="session")
def engine(model_dir):
    from vllm_elastic.core import Engine

    return Engine.from_pretrained(model_dir, max_batch_size=16, max_request_tokens=512)


# -- the served engine shared by the serving tests ------------------------------------------

SERVED_CFG = {"gen_length": 64, "block_length": 32}
SERVED_MODEL = "mini-llada"
SERVED_SEQS = 16            # --max-num-seqs: at most this many requests run at once
SERVED_POOL_FRACTION = 0.25  # the KV pool: this share of what SERVED_SEQS requests need


@dataclass
class Served:
    server: Any     # tests.harness.server.Server
    pool: Any       # tests.harness.load.PoolPlan
    cfg: dict[str, Any]
    model: str


@pytest.fixture(scope="session")
def served(model_dir, dev_prompts, tokenizer, tmp_path_factory):
    """One `vllm-elastic serve` (float32, block size 32, server config SERVED_CFG) for the
    serving tests. Its KV pool holds SERVED_POOL_FRACTION of what SERVED_SEQS concurrent
    requests of the longest prompt they send need, and max_model_len is what the pool
    holds; POST /reset_prefix_cache?reset_running_requests=true preempts (dev mode)."""
    from model_executor.tokenizer import render_prompt
    from tests.harness.load import pool_for_load
    from tests.harness.server import Server, ServerConfig
    from tests.harness.workload import UNICODE_MESSAGE

    unicode_prompt = render_prompt(tokenizer, {"messages": [
        {"role": "user", "content": UNICODE_MESSAGE}]})
    longest = max(len(p) for p in [*dev_prompts, unicode_prompt])
    pool = pool_for_load(SERVED_SEQS, longest, SERVED_CFG["gen_length"], 32,
                         SERVED_POOL_FRACTION)
    cfg = ServerConfig(model_dir, served_model_name=SERVED_MODEL, elastic=SERVED_CFG,
                       max_model_len=pool.max_model_len, block_size=32,
                       max_num_seqs=SERVED_SEQS, num_blocks=pool.num_blocks)
    server = Server(cfg, tmp_path_factory.mktemp("serve") / "server.log").start()
    try:
        yield Served(server, pool, SERVED_CFG, SERVED_MODEL)
    finally:
        server.stop()
