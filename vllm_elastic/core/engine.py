"""The engine core on its own (no vLLM): requests in, denoising steps, results out.

It owns the model, the paged store and a first-come-first-served admission: a waiting
request starts when a batch slot and its pages are free; a finished or aborted request
returns its pages at once. vLLM's adapters drive the same `StepRunner` and `Request`
with vLLM's own scheduler and block tables instead.
"""

from __future__ import annotations

import itertools
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import torch

from model_executor.llada import LLaDAModel
from model_executor.parallel import TensorParallel
from model_executor.tokenizer import SpecialIds

from .kv_store import KVPoolExhausted, PagedKVStore, StoreLayout
from .params import GenerationParams, InvalidRequest
from .request import Request, StepOutput
from .step_runner import StepRunner


@dataclass
class GenerationResult:
    request_id: str
    token_ids: list[int]
    finish_reason: str | None
    stats: dict[str, Any]


class Engine:
    def __init__(self, model: LLaDAModel, special: SpecialIds, *, max_batch_size: int = 32,
                 page_size: int = 16, num_pages: int | None = None,
                 max_request_tokens: int = 1024, keep_layer_state: bool = True):
        self.model = model
        self.special = special
        self.max_batch_size = max_batch_size
        cfg = model.cfg
        if num_pages is None:
            num_pages = max_batch_size * -(-max_request_tokens // page_size)
        layout = StoreLayout(
            num_layers=cfg.n_layers, num_pages=num_pages, page_size=page_size,
            num_heads=cfg.n_heads // model.tp.world_size, head_dim=cfg.head_dim,
            hidden_size=cfg.d_model, keep_layer_inputs=keep_layer_state,
            dtype=model.dtype, device=model.device)
        self.store = PagedKVStore(layout)
        self.runner = StepRunner(model, self.store)
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self._ids = itertools.count()

    @classmethod
    def from_pretrained(cls, folder: str, *, dtype: torch.dtype = torch.float32,
                        device: str = "cpu", tp: TensorParallel | None = None,
                        **kwargs: Any) -> "Engine":
        from model_executor.tokenizer import special_ids

        model = LLaDAModel.from_pretrained(folder, dtype=dtype, device=device, tp=tp)
        return cls(model, special_ids(folder), **kwargs)

    # -- requests ----------------------------------------------------------------------------

    def make_request(self, prompt_ids: list[int], params: GenerationParams,
                     request_id: str | None = None) -> Request:
        """A validated request (refused before any work if anything is wrong)."""
        params.validate(len(prompt_ids), self.model.cfg.max_sequence_length)
        from .policies import POLICIES

        if POLICIES[params.policy.name].needs_layer_state and self.store.x is None:
            raise InvalidRequest(
                f"policy {params.policy.name!r} needs per-layer hidden states, which this "
                "engine's KV store does not keep (keep_layer_state=False)")
        vocab = self.model.cfg.embedding_size
        if any((not isinstance(t, int)) or t < 0 or t >= vocab for t in prompt_ids):
            raise InvalidRequest(f"prompt token ids must be integers in [0, {vocab})")
        rid = request_id if request_id is not None else f"req-{next(self._ids)}"
        need = self.store.pages_for(len(prompt_ids) + params.decode.gen_length)
        if need > self.store.layout.num_pages:
            raise InvalidRequest(
                f"request {rid!r} needs {need} KV pages but the pool has only "
                f"{self.store.layout.num_pages}")
        return Request(rid, prompt_ids, params, self.special, device=self.model.device)

    def add_request(self, prompt_ids: list[int], params: GenerationParams,
                    request_id: str | None = None) -> Request:
        req = self.make_request(prompt_ids, params, request_id)
        if any(r.id == req.id for r in itertools.chain(self.waiting, self.running)):
            raise InvalidRequest(f"request id {req.id!r} is already in use")
        self.waiting.append(req)
        return req

    def abort(self, request_id: str) -> None:
        for r in list(self.running):
            if r.id == request_id:
                self.running.remove(r)
                self._release(r)
        self.waiting = deque(r for r in self.waiting if r.id != request_id)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def _release(self, r: Request) -> None:
        self.store.free(r.id)
        r.slot_map = None
        r.pages = []

    def _admit(self) -> None:
        while self.waiting and len(self.running) < self.max_batch_size:
            r = self.waiting[0]
            try:
                r.pages = self.store.allocate(r.id, r.total_len)
            except KVPoolExhausted:
                if not self.running:
                    raise
                return
            r.slot_map = self.store.slot_map(r.pages, r.total_len)
            self.waiting.popleft()
            self.running.append(r)

    # -- stepping ----------------------------------------------------------------------------

    def step(self) -> list[StepOutput]:
        """One denoising step for every running request (admitting waiting ones first)."""
        self._admit()
        if not self.running:
            return []
        outputs = self.runner.step(self.running)
        for r in [r for r in self.running if r.finished]:
            self.running.remove(r)
            self._release(r)
        return outputs

    def generate(self, prompts: Iterable[list[int]],
                 params: GenerationParams | list[GenerationParams],
                 on_finish: Callable[[Request], None] | None = None
                 ) -> list[GenerationResult]:
        """Run prompts to completion; results in input order."""
        prompts = list(prompts)
        plist = params if isinstance(params, list) else [params] * len(prompts)
        if len(plist) != len(prompts):
            raise ValueError("one GenerationParams per prompt")
        reqs = [self.make_request(p, gp, f"gen-{next(self._ids)}")
                for p, gp in zip(prompts, plist)]
        self.waiting.extend(reqs)
        while self.has_unfinished():
            before = {r.id for r in self.running}
            self.step()
            if on_finish is not None:
                still = {r.id for r in self.running}
                for r in reqs:
                    if r.id in before and r.id not in still:
                        on_finish(r)
        L = self.model.cfg.n_layers
        return [GenerationResult(r.id, r.output_token_ids(), r.finish_reason,
                                 r.stats.as_dict(L)) for r in reqs]
