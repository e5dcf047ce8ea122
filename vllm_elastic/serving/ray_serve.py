"""N replicas of a vLLM engine (with the elastic plugin) behind one Ray Serve HTTP route.

Ray Serve's own proxy spreads requests over the replicas and its autoscaling settings
size them; each replica is one `AsyncLLM` engine serving OpenAI-style
`/v1/chat/completions` and `/v1/completions` (non-streaming) with the same per-request
`vllm_xargs` as the vLLM server. Every response says which replica served it
(`system_fingerprint` and the `x-served-by` header).

    from vllm_elastic.serving.ray_serve import build_app
    serve.run(build_app("path/to/llada", num_replicas=2), route_prefix="/")
"""

from __future__ import annotations

import inspect
import os
import time
import uuid
from typing import Any

from fastapi import FastAPI
from fastapi.responses import JSONResponse
from ray import serve

api = FastAPI()

# OpenAI fields passed to SamplingParams as they are: the plugin's validation refuses
# those the diffusion decoder cannot honour, as on the vLLM server.
_SAMPLING_FIELDS = ("max_tokens", "temperature", "seed", "n", "logprobs", "presence_penalty",
                    "frequency_penalty", "logit_bias", "stop")


@serve.deployment(ray_actor_options={"num_cpus": 1})
@serve.ingress(api)
class LLaDAServer:
    """One vLLM engine. The constructor's `engine_args` are vLLM's `AsyncEngineArgs`."""

    def __init__(self, model: str, engine_args: dict[str, Any] | None = None):
        os.environ.setdefault("VLLM_PLUGINS", "elastic")
        from vllm.engine.arg_utils import AsyncEngineArgs
        from vllm.v1.engine.async_llm import AsyncLLM

        self.model = model
        self.engine = AsyncLLM.from_engine_args(AsyncEngineArgs(model=model,
                                                                **(engine_args or {})))
        self.replica = serve.get_replica_context().replica_id.unique_id
        self.tokenizer = None

    async def _tokens(self, body: dict[str, Any], chat: bool) -> list[int]:
        if self.tokenizer is None:
            tok = self.engine.get_tokenizer()
            self.tokenizer = await tok if inspect.isawaitable(tok) else tok
        if chat:
            messages = body.get("messages")
            if not isinstance(messages, list) or not messages:
                raise ValueError("'messages' must be a non-empty list")
            ids = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True,
                                                     tokenize=True)
            return list(ids["input_ids"] if hasattr(ids, "keys") else ids)
        prompt = body.get("prompt")
        if not isinstance(prompt, str):
            raise ValueError("'prompt' must be a string")
        return self.tokenizer.encode(prompt, add_special_tokens=False)

    async def _generate(self, body: dict[str, Any], chat: bool) -> JSONResponse:
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        headers = {"x-served-by": self.replica}
        try:
            if body.get("stream"):
                raise ValueError("this route does not stream; use the vLLM server for that")
            ids = await self._tokens(body, chat)
            fields = {k: body[k] for k in _SAMPLING_FIELDS if body.get(k) is not None}
            if isinstance(fields.get("logprobs"), bool):  # chat's boolean form
                fields["logprobs"] = body.get("top_logprobs", 1) if fields["logprobs"] else None
            # As vLLM's OpenAI server: without max_tokens the canvas length governs.
            fields.setdefault("max_tokens", self.engine.model_config.max_model_len - len(ids))
            params = SamplingParams(**fields, extra_args=body.get("vllm_xargs"))
            rid = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}"
            final = None
            async for out in self.engine.generate(TokensPrompt(prompt_token_ids=ids),
                                                  params, rid):
                final = out
        except Exception as e:  # noqa: BLE001 - the client gets the reason
            return JSONResponse({"error": {"message": str(e), "type": "BadRequestError"}},
                                status_code=400, headers=headers)
        comp = final.outputs[0]
        usage = {"prompt_tokens": len(ids), "completion_tokens": len(comp.token_ids),
                 "total_tokens": len(ids) + len(comp.token_ids)}
        choice: dict[str, Any] = {"index": 0, "finish_reason": comp.finish_reason,
                                  "token_ids": list(comp.token_ids)}
        if chat:
            choice["message"] = {"role": "assistant", "content": comp.text}
        else:
            choice["text"] = comp.text
        return JSONResponse({
            "id": rid, "object": "chat.completion" if chat else "text_completion",
            "created": int(time.time()), "model": body.get("model", self.model),
            "choices": [choice], "usage": usage, "system_fingerprint": self.replica,
        }, headers=headers)

    @api.post("/v1/chat/completions")
    async def chat_completions(self, body: dict[str, Any]) -> JSONResponse:
        return await self._generate(body, chat=True)

    @api.post("/v1/completions")
    async def completions(self, body: dict[str, Any]) -> JSONResponse:
        return await self._generate(body, chat=False)

    @api.get("/health")
    async def health(self) -> dict[str, str]:
        return {"replica": self.replica}


def build_app(model: str, num_replicas: int | None = 2, engine_args: dict[str, Any] | None = None,
              autoscaling_config: dict[str, Any] | None = None):
    """The Serve application: a fixed `num_replicas`, or Ray Serve autoscaling."""
    if autoscaling_config is not None:
        dep = LLaDAServer.options(autoscaling_config=autoscaling_config)
    else:
        dep = LLaDAServer.options(num_replicas=num_replicas,
                                  max_ongoing_requests=64)
    return dep.bind(model, engine_args)
