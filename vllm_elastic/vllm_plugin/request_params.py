"""From vLLM's request (SamplingParams + server config) to the core's GenerationParams.

Precedence, lowest first:
1. the core's defaults (`vllm_elastic.core.params`: gen_length 256, block_length 32, ...);
2. server-wide `--additional-config '{"elastic": {...}}'`;
3. SamplingParams fields with a meaning for LLaDA: `temperature` (Gumbel noise),
   `seed`, `ignore_eos` (-> stop_at_eos=False);
4. per-request `vllm_xargs` / `SamplingParams.extra_args` (same keys as the server config).

`max_tokens` does not change the canvas: the request still denoises `gen_length`
positions (LLaDA conditions on its canvas length), vLLM emits at most `max_tokens` of them
and then finishes the request with finish_reason "length" (its KV blocks are freed at once).
"""

from __future__ import annotations

import json
from dataclasses import fields
from typing import Any

from vllm_elastic.core.params import DecodeParams, GenerationParams, InvalidRequest, PolicyParams

SERVER_CONFIG_KEY = "elastic"
# Keys vLLM itself puts into extra_args (not ours to validate).
VLLM_EXTRA_KEYS = frozenset({"kv_transfer_params", "ec_transfer_params"})
_BOOL_KEYS = frozenset(f.name for cls in (DecodeParams, PolicyParams) for f in fields(cls)
                       if str(f.type).startswith("bool"))
_STR_KEYS = frozenset({"policy", "cache_policy", "drift"})
# Policies whose rows are the current block: a sliding window's candidates would lie
# outside them (the core's step runner fails on that combination).
_BLOCKWISE_POLICIES = frozenset({"prefix", "dual"})


def server_config(vllm_config: Any) -> dict[str, Any]:
    extra = getattr(vllm_config, "additional_config", None) or {}
    cfg = extra.get(SERVER_CONFIG_KEY, {}) if isinstance(extra, dict) else {}
    if not isinstance(cfg, dict):
        raise InvalidRequest(
            f"--additional-config '{SERVER_CONFIG_KEY}' must be a JSON object, got {cfg!r}")
    return dict(cfg)


def server_defaults(vllm_config: Any) -> dict[str, Any]:
    """The server's parameter overrides, checked (raises InvalidRequest on a bad config).

    Kept as a dict and merged with each request's overrides before the core builds the
    GenerationParams: a GenerationParams base would carry values the core derives from the
    server's policy (e.g. Elastic-Cache's default window) into requests of other policies.
    """
    cfg = _parse(server_config(vllm_config))
    try:
        GenerationParams.from_dict(cfg)
    except InvalidRequest as e:
        raise InvalidRequest(f"--additional-config {SERVER_CONFIG_KEY}: {e}") from e
    return cfg


def _parse(d: dict[str, Any]) -> dict[str, Any]:
    """vllm_xargs values arrive as str/int/float/list: read JSON literals in strings."""
    out = {}
    for k, v in d.items():
        if isinstance(v, str) and k not in _STR_KEYS:
            try:
                v = json.loads(v)
            except ValueError:
                pass
        if k in _BOOL_KEYS and isinstance(v, int) and not isinstance(v, bool) and v in (0, 1):
            v = bool(v)
        out[k] = v
    return out


def request_params(sp: Any, base: dict[str, Any]) -> GenerationParams:
    """The validated GenerationParams of one request (raises InvalidRequest)."""
    extra = sp.extra_args or {}
    if not isinstance(extra, dict):
        raise InvalidRequest(f"vllm_xargs must be a JSON object, got {extra!r}")
    over = _parse({k: v for k, v in extra.items() if k not in VLLM_EXTRA_KEYS})
    if "temperature" not in over:
        over["temperature"] = float(sp.temperature or 0.0)
    if "seed" not in over and sp.seed is not None:
        over["seed"] = int(sp.seed)
    if "stop_at_eos" not in over and sp.ignore_eos:
        over["stop_at_eos"] = False
    params = GenerationParams.from_dict({**base, **over})
    if params.decode.window is not None and params.policy.name in _BLOCKWISE_POLICIES:
        raise InvalidRequest(
            f"window (beta) is a sliding window over the whole generation; policy "
            f"{params.policy.name!r} caches block by block and needs window unset")
    return params


def gen_length_of(sp: Any, base: dict[str, Any]) -> int:
    """The canvas length of a request (validated params; the server's on a bad request)."""
    try:
        return request_params(sp, base).decode.gen_length
    except InvalidRequest:
        return GenerationParams.from_dict(base).decode.gen_length
