"""Ray Serve: two replicas of the vLLM engine behind one route serve 20 requests, equal
to the engine core's own answers, and shut down cleanly."""

from __future__ import annotations

import concurrent.futures as cf
import json
import socket
import time
import urllib.error
import urllib.request

import pytest

ray = pytest.importorskip("ray")
serve = pytest.importorskip("ray.serve")
pytestmark = pytest.mark.vllm

CFG = {"gen_length": 64, "block_length": 32}
POLICIES = ["none", "elastic", "dual", "spa", "prefix", "dkv"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _post(url: str, body: dict) -> tuple[dict, str]:
    req = urllib.request.Request(url, data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=600) as r:
            return json.loads(r.read()), r.headers.get("x-served-by")
    except urllib.error.HTTPError as e:
        e.msg = f"{e.msg}: {e.read().decode(errors='replace')}"
        raise


def test_two_replicas_serve_and_match_core(model_dir, dev_items, tokenizer, engine):
    from model_executor.tokenizer import render_prompt
    from vllm_elastic.core import GenerationParams
    from vllm_elastic.serving.ray_serve import build_app

    items = dev_items[:20]
    bodies = [{"messages": it["messages"], "temperature": 0.0,
               "vllm_xargs": {"policy": POLICIES[i % len(POLICIES)]}}
              for i, it in enumerate(items)]
    want = engine.generate(
        [render_prompt(tokenizer, {"messages": it["messages"]}) for it in items],
        [GenerationParams.from_dict({**CFG, "policy": b["vllm_xargs"]["policy"]})
         for b in bodies])

    port = _free_port()
    ray.init(num_cpus=4, include_dashboard=False, configure_logging=False,
             runtime_env={"env_vars": {"VLLM_PLUGINS": "elastic", "OMP_NUM_THREADS": "1"}})
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        serve.run(build_app(model_dir, num_replicas=2, engine_args={
            "dtype": "float32", "max_model_len": 1024, "block_size": 32, "max_num_seqs": 16,
            "kv_cache_memory_bytes": 64 * 2 ** 20,
            "additional_config": {"elastic": CFG}}), route_prefix="/")
        url = f"http://127.0.0.1:{port}/v1/chat/completions"
        with cf.ThreadPoolExecutor(8) as pool:
            answers = list(pool.map(lambda b: _post(url, b), bodies))
        served_by = {who for _, who in answers}
        assert len(served_by) == 2, served_by
        for (resp, _), ref in zip(answers, want):
            assert resp["choices"][0]["token_ids"] == ref.token_ids
        bad, _ = None, None
        try:
            _post(url, {**bodies[0], "n": 2})
        except urllib.error.HTTPError as e:
            bad = e.code
        assert bad == 400
    finally:
        t0 = time.time()
        serve.shutdown()
        ray.shutdown()
        assert time.time() - t0 < 120
