"""Shared fixtures: the mini model, its dev prompts and one engine per session."""

from __future__ import annotations

import json
import os
from pathlib import Path

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
