"""Refuse requests LLaDA cannot honour, before any work, with a message naming the parameter.

Runs in vLLM's frontend (`InputProcessor.process_inputs`, see `registration.py`), so a
refused request becomes HTTP 400 in `vllm serve` and a `VLLMValidationError` in
`LLM.generate`; nothing reaches the engine core and the server keeps serving.

Refused (why): LLaDA's decoding rule picks every token by argmax over the canvas (with
Gumbel noise at temperature > 0); the engine core has no per-token sampler, no log-probs
and no constrained decoding.
"""

from __future__ import annotations

from typing import Any

from vllm_elastic.core.params import GenerationParams, InvalidRequest

from .request_params import VLLM_EXTRA_KEYS, request_params

_WHY_SAMPLER = "LLaDA commits tokens by its own argmax/Gumbel rule, there is no sampler"


def _refusals(sp: Any) -> list[tuple[str, Any, str]]:
    """(parameter, value, reason) for every unsupported SamplingParams setting."""
    out = []

    def check(name: str, bad: bool, why: str) -> None:
        if bad:
            out.append((name, getattr(sp, name, None), why))

    g = lambda name, default=None: getattr(sp, name, default)  # noqa: E731
    check("n", g("n", 1) != 1, "one canvas is decoded per request; send n separate requests")
    check("best_of", (g("best_of") or 1) != 1, "one canvas is decoded per request")
    check("logprobs", g("logprobs") is not None,
          "tokens are committed by a confidence rule over the canvas, no log-probs are "
          "computed (this also rules out beam search)")
    check("prompt_logprobs", g("prompt_logprobs") is not None, "no prompt log-probs")
    check("presence_penalty", (g("presence_penalty") or 0.0) != 0.0, _WHY_SAMPLER)
    check("frequency_penalty", (g("frequency_penalty") or 0.0) != 0.0, _WHY_SAMPLER)
    check("repetition_penalty", (g("repetition_penalty") or 1.0) != 1.0, _WHY_SAMPLER)
    check("logit_bias", bool(g("logit_bias")), _WHY_SAMPLER)
    check("allowed_token_ids", bool(g("allowed_token_ids")), _WHY_SAMPLER)
    check("bad_words", bool(g("bad_words")), _WHY_SAMPLER)
    check("structured_outputs", g("structured_outputs") is not None,
          "guided / structured decoding is not supported for diffusion decoding")
    check("min_tokens", (g("min_tokens") or 0) > 0,
          "the canvas decides where the answer ends; min_tokens cannot be enforced")
    temp = g("temperature", 0.0) or 0.0
    if temp >= 1e-5:
        check("top_p", (g("top_p") or 1.0) < 1.0, _WHY_SAMPLER + " (only temperature)")
        check("top_k", (g("top_k") or 0) > 0, _WHY_SAMPLER + " (only temperature)")
        check("min_p", (g("min_p") or 0.0) > 0.0, _WHY_SAMPLER + " (only temperature)")
    check("logits_processors", bool(g("logits_processors")), _WHY_SAMPLER)
    check("thinking_token_budget", g("thinking_token_budget") is not None,
          "no reasoning-budget control in diffusion decoding")
    check("repetition_detection", g("repetition_detection") is not None,
          "not supported for diffusion decoding")
    # vLLM's own extra_args keys (kv_transfer_params, ...): vLLM reads them as JSON objects
    # after this check; anything else there fails in its output processor (HTTP 500).
    extra = g("extra_args") or {}
    for key in sorted(VLLM_EXTRA_KEYS):
        if isinstance(extra, dict) and key in extra and not isinstance(extra[key], dict):
            out.append((key, extra[key], "vLLM reads it as a JSON object"))
    return out


def validate_request(sp: Any, base: dict[str, Any], prompt_len: int | None,
                     max_model_len: int) -> GenerationParams:
    """The request's GenerationParams, or VLLMValidationError (HTTP 400) saying why not."""
    from vllm.exceptions import VLLMValidationError

    bad = _refusals(sp)
    if bad:
        name, value, why = bad[0]
        raise VLLMValidationError(
            f"LLaDA (vllm-elastic) does not support '{name}'={value!r}: {why}.",
            parameter=name, value=value)
    try:
        params = request_params(sp, base)
        # prompt + canvas must leave one position free below max_model_len: vLLM
        # stops a request whose length reaches max_model_len.
        if prompt_len is not None:
            params.validate(prompt_len, max_model_len - 1)
    except InvalidRequest as e:
        raise VLLMValidationError(f"LLaDA (vllm-elastic) request refused: {e}",
                                  parameter="vllm_xargs") from e
    return params
