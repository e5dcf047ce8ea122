"""Async HTTP clients of the OpenAI endpoints (httpx): good requests, hang-ups, raw bodies.

`send_good()` sends one `RequestSpec` (chat or completions, streaming or not, with
`return_token_ids`) and reads back prompt ids, token ids, text, finish reason and usage,
timing the whole request and, for streams, the first chunk that carries a token. A spec
with `disconnect_after` closes its connection early. `send_raw()` posts arbitrary bytes and
returns the status and the error message the server gave.
"""

from __future__ import annotations

import asyncio
import json
import time
from dataclasses import dataclass, field
from typing import Any

import httpx

from .workload import RequestSpec

PATHS = {"chat": "/v1/chat/completions", "completion": "/v1/completions"}


@dataclass
class Outcome:
    """What came back for one request."""

    status: int | None = None       # HTTP status (None: no response at all)
    prompt_ids: list[int] | None = None
    token_ids: list[int] = field(default_factory=list)
    text: str = ""
    finish_reason: str | None = None
    usage: dict[str, int] | None = None
    error: str | None = None        # error message (HTTP error body, stream error event,
    #                                 or the transport error)
    latency_s: float = 0.0
    ttft_s: float | None = None     # first streamed chunk carrying a token
    disconnected: bool = False      # the client hung up on purpose
    chunks: int = 0


def good_body(spec: RequestSpec, model: str) -> dict[str, Any]:
    job = spec.job
    body: dict[str, Any] = {"model": model, "temperature": job.temperature,
                            "return_token_ids": True, "vllm_xargs": job.xargs_dict}
    if spec.endpoint == "chat":
        body["messages"] = job.messages_list
    else:
        body["prompt"] = list(job.prompt)
    if job.seed is not None:
        body["seed"] = job.seed
    if spec.max_tokens is not None:
        body["max_tokens"] = spec.max_tokens
    if spec.stream:
        body["stream"] = True
        body["stream_options"] = {"include_usage": True}
    return body


def error_message(text: str) -> str:
    """The message of an OpenAI-style error body (`{"error": {"message"}}` or FastAPI's
    `{"detail"}`), else the raw text."""
    try:
        obj = json.loads(text)
    except ValueError:
        return text[:2000]
    if isinstance(obj, dict):
        err = obj.get("error")
        if isinstance(err, dict) and "message" in err:
            return str(err["message"])
        if "detail" in obj:
            return str(obj["detail"])
    return text[:2000]


def _take_choice(out: Outcome, endpoint: str, choice: dict[str, Any], stream: bool) -> None:
    if endpoint == "chat":
        part = choice.get("delta" if stream else "message") or {}
        out.text += part.get("content") or ""
    else:
        out.text += choice.get("text") or ""
        if choice.get("prompt_token_ids"):
            out.prompt_ids = list(choice["prompt_token_ids"])
    out.token_ids += list(choice.get("token_ids") or [])
    out.finish_reason = choice.get("finish_reason") or out.finish_reason


async def _plain(client: httpx.AsyncClient, spec: RequestSpec, body: dict[str, Any],
                 out: Outcome) -> None:
    r = await client.post(PATHS[spec.endpoint], json=body)
    out.status = r.status_code
    if r.status_code != 200:
        out.error = error_message(r.text)
        return
    obj = r.json()
    if obj.get("prompt_token_ids"):
        out.prompt_ids = list(obj["prompt_token_ids"])
    for c in obj.get("choices", []):
        _take_choice(out, spec.endpoint, c, stream=False)
    out.usage = obj.get("usage")


async def _streamed(client: httpx.AsyncClient, spec: RequestSpec, body: dict[str, Any],
                    out: Outcome, t0: float) -> None:
    async with client.stream("POST", PATHS[spec.endpoint], json=body) as r:
        out.status = r.status_code
        if r.status_code != 200:
            out.error = error_message((await r.aread()).decode(errors="replace"))
            return
        async for line in r.aiter_lines():
            if not line.startswith("data: "):
                continue
            data = line[len("data: "):]
            if data.strip() == "[DONE]":
                break
            obj = json.loads(data)
            out.chunks += 1
            if "error" in obj:
                out.error = error_message(data)
                continue
            if obj.get("prompt_token_ids"):
                out.prompt_ids = list(obj["prompt_token_ids"])
            if obj.get("usage"):
                out.usage = obj["usage"]
            before = len(out.token_ids)
            for c in obj.get("choices", []):
                _take_choice(out, spec.endpoint, c, stream=True)
            if out.ttft_s is None and len(out.token_ids) > before:
                out.ttft_s = time.monotonic() - t0
            if spec.disconnect_after is not None and out.chunks >= spec.disconnect_after:
                out.disconnected = True
                return  # leaving the context closes the connection mid-stream


async def send_good(client: httpx.AsyncClient, spec: RequestSpec, model: str) -> Outcome:
    """Send one good request; transport failures are recorded, never raised."""
    out = Outcome()
    body = good_body(spec, model)
    t0 = time.monotonic()
    try:
        if spec.stream:
            await _streamed(client, spec, body, out, t0)
        elif spec.disconnect_after is not None:
            try:
                await asyncio.wait_for(_plain(client, spec, body, out),
                                       spec.disconnect_delay_s)
            except asyncio.TimeoutError:
                out.disconnected = True  # the cancelled request's connection is closed
        else:
            await _plain(client, spec, body, out)
    except (httpx.HTTPError, ValueError) as e:
        out.error = f"{type(e).__name__}: {e}"
    out.latency_s = time.monotonic() - t0
    return out


async def send_raw(client: httpx.AsyncClient, path: str, content: bytes,
                   content_type: str = "application/json") -> Outcome:
    """POST raw bytes; a 200 stream's error event counts as the error message."""
    out = Outcome()
    t0 = time.monotonic()
    try:
        async with client.stream("POST", path, content=content,
                                 headers={"content-type": content_type}) as r:
            out.status = r.status_code
            text = (await r.aread()).decode(errors="replace")
        if r.status_code != 200:
            out.error = error_message(text)
        else:
            for line in text.splitlines():
                if line.startswith("data: ") and '"error"' in line:
                    out.error = error_message(line[len("data: "):])
                    break
            else:
                out.text = text[:2000]
    except httpx.HTTPError as e:
        out.error = f"{type(e).__name__}: {e}"
    out.latency_s = time.monotonic() - t0
    return out
