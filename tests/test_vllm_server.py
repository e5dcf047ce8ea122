"""`vllm serve` with the elastic plugin: refusals, metrics, preemption, aborts, stop strings.

One server for the session (`served` in conftest.py), shared with test_vllm_server_load.py,
where concurrent answers (chat and completions, streamed and plain, every policy) are
compared token for token with the engine core's.
"""

from __future__ import annotations

import concurrent.futures as cf
import time

import pytest

from tests.conftest import SERVED_MODEL as MODEL_NAME
from tests.harness.reference import references
from tests.harness.workload import Job

pytestmark = pytest.mark.vllm


@pytest.fixture(scope="module")
def server(served):
    return served.server


@pytest.fixture(scope="module")
def client(served):
    from openai import OpenAI

    return OpenAI(base_url=served.server.base + "/v1", api_key="none", max_retries=0,
                  timeout=600)


def _core_many(engine, served, jobs):
    """The core's results for (prompt ids, xargs, temperature, seed) jobs, each alone, with
    the plugin's parameter merge and the server worker's thread count
    (tests/harness/reference.py)."""
    js = [Job(tuple(p), (), tuple(sorted(x.items())), t, s) for p, x, t, s in jobs]
    refs = references(engine, js, served.cfg, served.server.worker_threads())
    return [refs[j.key()] for j in js]


def _completion(client, prompt_ids, **kw):
    """(prompt ids, token ids, text, finish reason, usage) of one completions call."""
    extra = dict(kw.pop("extra_body", {}), return_token_ids=True)
    r = client.completions.create(model=MODEL_NAME, prompt=prompt_ids, extra_body=extra, **kw)
    c = r.choices[0]
    return c.prompt_token_ids, c.token_ids, c.text, c.finish_reason, r.usage


BAD = [
    ("chat", {"n": 2}, "'n'"),
    ("chat", {"logprobs": True, "top_logprobs": 2}, "logprobs"),
    ("completion", {"logprobs": 2}, "logprobs"),
    ("chat", {"presence_penalty": 0.5}, "presence_penalty"),
    ("chat", {"frequency_penalty": 0.5}, "frequency_penalty"),
    ("chat", {"extra_body": {"repetition_penalty": 1.3}}, "repetition_penalty"),
    ("chat", {"logit_bias": {"5": 3}}, "logit_bias"),
    ("chat", {"extra_body": {"structured_outputs": {"choice": ["yes", "no"]}}},
     "structured"),
    ("chat", {"extra_body": {"min_tokens": 4}}, "min_tokens"),
    ("chat", {"temperature": 0.7, "top_p": 0.5}, "top_p"),
    ("completion", {"extra_body": {"use_beam_search": True, "n": 2}}, ""),
    ("chat", {"extra_body": {"vllm_xargs": {"policy": "bogus"}}}, "unknown cache policy"),
    ("chat", {"extra_body": {"vllm_xargs": {"gen_length": 48, "block_length": 32}}},
     "not a multiple of block_length"),
    ("chat", {"extra_body": {"vllm_xargs": {"gen_lenght": 64}}}, "unknown generation parameter"),
    ("chat", {"extra_body": {"vllm_xargs": {"gen_length": "lots"}}}, "gen_length"),
    ("chat", {"extra_body": {"vllm_xargs": {"threshold": 2.0}}}, "threshold"),
    ("chat", {"extra_body": {"vllm_xargs": {"policy": "dual", "window": 8}}}, "window"),
    ("completion_long", {}, "exceeds"),
    ("completion_too_long", {}, ""),
]


@pytest.mark.parametrize("kind,kw,needle", BAD, ids=[f"{b[0]}-{i}" for i, b in enumerate(BAD)])
def test_bad_request_is_400(client, served, kind, kw, needle):
    import openai

    kw = dict(kw)
    max_model_len = served.pool.max_model_len
    msgs = [{"role": "user", "content": "Hi"}]
    with pytest.raises(openai.BadRequestError) as ei:
        if kind == "chat":
            client.chat.completions.create(model=MODEL_NAME, messages=msgs, max_tokens=8, **kw)
        elif kind == "completion":
            client.completions.create(model=MODEL_NAME, prompt="Hi", max_tokens=8, **kw)
        elif kind == "completion_long":  # prompt + gen_length > max_model_len
            client.completions.create(model=MODEL_NAME, prompt=[5] * (max_model_len - 40),
                                      max_tokens=8)
        else:  # prompt alone over max_model_len (vLLM's own check)
            client.completions.create(model=MODEL_NAME, prompt=[5] * (max_model_len + 10),
                                      max_tokens=8)
    assert ei.value.status_code == 400
    assert needle.lower() in str(ei.value).lower(), str(ei.value)


def test_bad_stream_request_reports_error(client):
    """Streaming: vLLM validates after the stream has started (HTTP 200), so the refusal
    arrives as the stream's error event, with the same message."""
    import openai

    with pytest.raises(openai.APIError, match="unknown cache policy 'bogus'"):
        for _ in client.chat.completions.create(
                model=MODEL_NAME, messages=[{"role": "user", "content": "Hi"}], stream=True,
                extra_body={"vllm_xargs": {"policy": "bogus"}}):
            pass


def test_good_request_after_bad_ones(client):
    r = client.chat.completions.create(
        model=MODEL_NAME, messages=[{"role": "user", "content": "What is 2 + 3?"}],
        temperature=0, max_tokens=8, extra_body={"vllm_xargs": {"policy": "elastic"}})
    assert r.choices[0].finish_reason in ("stop", "length")
    assert r.usage.completion_tokens >= 1


def _metric(metrics: dict[str, float], name: str) -> float:
    assert name in metrics, f"{name} not on /metrics"
    return metrics[name]


def test_metrics_show_cache_stats(server, client):
    client.completions.create(model=MODEL_NAME, prompt="The sum of 2 and 3 is", max_tokens=64,
                              temperature=0, extra_body={"vllm_xargs": {"policy": "elastic"}})
    time.sleep(1.0)
    text = server.metrics()
    assert _metric(text, "vllm_elastic:denoising_steps_total") > 0
    assert _metric(text, "vllm_elastic:tokens_committed_total") > 0
    assert _metric(text, "vllm_elastic:rows_computed_total") > 0
    assert _metric(text, "vllm_elastic:rows_full_total") >= \
        _metric(text, "vllm_elastic:rows_computed_total")
    _metric(text, "vllm_elastic:drift_events_total")
    assert 0 < _metric(text, "vllm_elastic:layer_refresh_fraction") <= 1
    assert 0 < _metric(text, "vllm_elastic:compute_fraction") <= 1
    assert _metric(text, "vllm_elastic:tokens_per_step") > 0


def test_preempted_requests_resume(served, server, client, engine, dev_prompts):
    """Running requests preempted mid-generation (their blocks freed) resume on new blocks
    and finish; none is lost. Policy 'none' recomputes everything each step, so its tokens
    must still equal the core's; cached policies do one full pass on resume."""
    policies = ["none", "none", "elastic", "spa", "dual"]
    prompts = dev_prompts[8:13]
    before = _metric(server.metrics(), "vllm:num_preemptions_total")

    def ask(p, pol):
        return _completion(client, p, max_tokens=100, temperature=0,
                           extra_body={"vllm_xargs": {"policy": pol}})

    with cf.ThreadPoolExecutor(len(prompts)) as pool:
        futures = [pool.submit(ask, p, pol) for p, pol in zip(prompts, policies)]
        deadline = time.time() + 60
        while time.time() < deadline and \
                _metric(server.metrics(), "vllm:num_requests_running") < 1:
            time.sleep(0.2)
        time.sleep(0.5)  # a few steps in: some tokens committed, none finished
        assert server.post("/reset_prefix_cache?reset_running_requests=true") == 200
        answers = [f.result() for f in futures]
    assert _metric(server.metrics(), "vllm:num_preemptions_total") > before
    refs = _core_many(engine, served,
                      [(p, {"policy": "none"}, 0.0, None) for p in prompts[:2]])
    for i, (pol, (_, ids, _, finish, usage)) in enumerate(zip(policies, answers)):
        assert finish in ("stop", "length") and ids
        assert usage.completion_tokens == len(ids)
        if pol == "none":
            assert list(ids) == refs[i].token_ids


def test_blocks_freed_after_finish_and_abort(server, client):
    """A stream closed after its first chunk is aborted: its blocks are freed."""
    stream = client.chat.completions.create(
        model=MODEL_NAME, messages=[{"role": "user", "content": "Count to fifty."}],
        stream=True, temperature=0, extra_body={"vllm_xargs": {"gen_length": 256}})
    for _ in stream:
        break
    stream.close()
    text = server.wait_idle(60)  # raises if the aborted request still runs
    assert _metric(text, "vllm:kv_cache_usage_perc") == 0.0
    test_good_request_after_bad_ones(client)


def test_idle_connection_outlives_client_expiry(server):
    """An idle keep-alive connection is still open after httpx's 5 s idle expiry (vLLM's
    own default would have closed it: a client reusing it then can lose a request)."""
    import http.client

    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=30)
    try:
        for wait in (0.0, 6.0):
            time.sleep(wait)
            conn.request("GET", "/health")
            r = conn.getresponse()  # RemoteDisconnected had the server closed it
            r.read()
            assert r.status == 200
    finally:
        conn.close()


def test_stop_strings(client, dev_prompts):
    """Stop strings are vLLM's (frontend): the answer is cut before the string, "stop"."""
    kw = dict(max_tokens=64, temperature=0, extra_body={"vllm_xargs": {"policy": "dual"}})
    full = client.completions.create(model=MODEL_NAME, prompt=dev_prompts[0], **kw)
    text = full.choices[0].text
    assert len(text) > 4
    stop = text[len(text) // 2:len(text) // 2 + 2]
    cut = client.completions.create(model=MODEL_NAME, prompt=dev_prompts[0], stop=[stop], **kw)
    assert cut.choices[0].finish_reason == "stop"
    assert cut.choices[0].text == text[:text.index(stop)]
