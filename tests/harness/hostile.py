"""Malformed and hostile requests, each with the refusal it must get.

Every case must be answered with a 4xx whose message contains `needle` (case-insensitive),
the word that names the problem. Streaming cases that vLLM validates after the response
has started (HTTP 200) must carry the refusal as the stream's error event instead
(`stream_error`); see docs/serving.md. Who answers is recorded in `by`: "vllm" (FastAPI /
pydantic / vLLM's frontend) or "plugin" (vllm_elastic's validation).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from .client import Outcome


@dataclass(frozen=True)
class HostileCase:
    name: str
    path: str
    body: bytes
    needle: str
    by: str
    stream_error: bool = False
    content_type: str = "application/json"

    def check(self, out: Outcome) -> str | None:
        """None when the refusal is right, else what is wrong with it."""
        if out.status is None:
            return f"no response ({out.error})"
        if self.stream_error:
            if out.status != 200 or out.error is None:
                return f"expected a stream error event, got {out.status} {out.text[:200]!r}"
        elif not 400 <= out.status < 500:
            return f"expected 4xx, got {out.status} {(out.error or out.text)[:200]!r}"
        if self.needle.lower() not in (out.error or "").lower():
            return f"message does not name {self.needle!r}: {(out.error or '')[:300]!r}"
        return None


CHAT, COMPLETION = "/v1/chat/completions", "/v1/completions"


def hostile_cases(model: str, max_model_len: int, gen_length: int) -> list[HostileCase]:
    """The hostile list for a server of this model name, max_model_len and default canvas."""
    msgs = [{"role": "user", "content": "Hi"}]

    def chat(**kw: Any) -> bytes:
        return json.dumps({"model": model, "messages": msgs, "max_tokens": 8,
                           "temperature": 0, **kw}).encode()

    def comp(**kw: Any) -> bytes:
        return json.dumps({"model": model, "prompt": "Hi", "max_tokens": 8,
                           "temperature": 0, **kw}).encode()

    too_long = [5] * (max_model_len + 10)
    canvas_too_long = [5] * (max_model_len - gen_length // 2)
    one_mb = "lorem ipsum " * (2 ** 20 // 12)
    c = HostileCase
    return [
        c("invalid JSON", CHAT, b'{"model": "%s", "messages": [' % model.encode(), "json",
          "vllm"),
        c("body not an object", CHAT, b"[1, 2, 3]", "dictionary", "vllm"),
        c("empty body", COMPLETION, b"", "body", "vllm"),
        c("not JSON content type", CHAT, chat(), "application/json", "vllm",
          content_type="text/plain"),
        c("invalid UTF-8", CHAT, chat()[:-1] + b', "user": "\xff\xfe"}', "body", "vllm"),
        c("deeply nested JSON", CHAT, chat()[:-1] + b', "user": ' + b"[" * 100000
          + b"]" * 100000 + b"}", "body", "vllm"),
        c("messages wrong type", CHAT, json.dumps({"model": model, "messages": "Hi"}).encode(),
          "messages", "vllm"),
        c("max_tokens wrong type", CHAT, chat(max_tokens="many"), "max_tokens", "vllm"),
        c("temperature wrong type", COMPLETION, comp(temperature="hot"), "temperature",
          "vllm"),
        c("temperature NaN", CHAT, chat(temperature=None).replace(b"null", b"NaN"),
          "temperature", "vllm"),
        c("missing messages", CHAT, json.dumps({"model": model}).encode(), "messages", "vllm"),
        c("missing prompt", COMPLETION, json.dumps({"model": model, "max_tokens": 8}).encode(),
          "prompt", "vllm"),
        c("empty messages", CHAT, chat(messages=[]), "empty conversation", "vllm"),
        c("empty prompt", COMPLETION, comp(prompt=""), "prompt", "vllm"),
        c("empty prompt ids", COMPLETION, comp(prompt=[]), "prompt", "vllm"),
        c("prompt over max_model_len", COMPLETION, comp(prompt=too_long),
          "maximum context length", "vllm"),
        c("prompt + gen_length over max_model_len", COMPLETION, comp(prompt=canvas_too_long),
          "exceeds", "plugin"),
        c("prompt id out of vocabulary", COMPLETION, comp(prompt=[10 ** 6, 5]), "vocabulary",
          "vllm"),
        c("max_tokens 0", CHAT, chat(max_tokens=0), "max_tokens", "vllm"),
        c("max_tokens negative", COMPLETION, comp(max_tokens=-3), "max_tokens", "vllm"),
        c("max_tokens huge", CHAT, chat(max_tokens=10 ** 12), "max_tokens", "vllm"),
        c("unknown policy", CHAT, chat(vllm_xargs={"policy": "bogus"}),
          "unknown cache policy", "plugin"),
        c("unknown policy (stream)", CHAT, chat(vllm_xargs={"policy": "bogus"}, stream=True),
          "unknown cache policy", "plugin", stream_error=True),
        c("vllm_xargs not an object", CHAT, chat(vllm_xargs="policy=none"), "vllm_xargs",
          "vllm"),
        c("vllm_xargs nested object", CHAT, chat(vllm_xargs={"policy": {"name": "none"}}),
          "vllm_xargs", "vllm"),
        c("vllm_xargs unknown key", CHAT, chat(vllm_xargs={"gen_lenght": 64}),
          "unknown generation parameter", "plugin"),
        c("vllm_xargs wrong type", CHAT, chat(vllm_xargs={"gen_length": "lots"}), "gen_length",
          "plugin"),
        c("vllm_xargs JSON object in a string", CHAT, chat(vllm_xargs={"gen_length": '{"a": 1}'}),
          "gen_length", "plugin"),
        c("vllm_xargs out of range", CHAT, chat(vllm_xargs={"threshold": 2.0}), "threshold",
          "plugin"),
        c("vllm_xargs NaN", CHAT, chat()[:-1] + b', "vllm_xargs": {"threshold": NaN}}',
          "threshold", "plugin"),
        c("vllm_xargs gen_length not a multiple", CHAT,
          chat(vllm_xargs={"gen_length": gen_length + 1}), "multiple of block_length",
          "plugin"),
        c("vllm_xargs kv_transfer_params not an object", COMPLETION,
          comp(vllm_xargs={"kv_transfer_params": "x"}), "kv_transfer_params", "plugin"),
        c("vllm_xargs control characters in a key", CHAT,
          chat(vllm_xargs={"pol\x07icy\x00": "none"}), "unknown generation parameter",
          "plugin"),
        c("n = 2", CHAT, chat(n=2, temperature=0.5), "'n'", "plugin"),
        c("n = 2 greedy", CHAT, chat(n=2), "n must be 1", "vllm"),
        c("n = 2 (stream)", CHAT, chat(n=2, temperature=0.5, stream=True), "'n'", "plugin",
          stream_error=True),
        c("logprobs (chat)", CHAT, chat(logprobs=True, top_logprobs=2), "logprobs", "plugin"),
        c("logprobs (completions)", COMPLETION, comp(logprobs=2), "logprobs", "plugin"),
        c("prompt_logprobs", COMPLETION, comp(prompt_logprobs=1), "prompt_logprobs", "plugin"),
        c("unicode model name", CHAT, chat(model="mïni-llada\x00🚀"), "does not exist", "vllm"),
        c("lone surrogate in content", CHAT,
          chat()[:-1].replace(b'"Hi"', b'"\\ud800 Hi"') + b"}", "textencodeinput", "vllm"),
        c("1 MB prompt", COMPLETION, comp(prompt=one_mb), "maximum context length", "vllm"),
        c("1 MB invalid JSON", CHAT, b"{" + b"x" * 2 ** 20, "json", "vllm"),
    ]
