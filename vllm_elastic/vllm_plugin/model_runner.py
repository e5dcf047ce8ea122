"""The platform-independent part of the plugin's vLLM model runner: LLaDA requests advanced
by the engine core's StepRunner.

`cpu_worker.ElasticCPUModelRunner` and `gpu_worker.ElasticGPUModelRunner` are this mixin
on top of vLLM's CPU and GPU runners; only memory profiling differs between them.

vLLM keeps doing what it does well: admission, block tables, preemption, abort, stop
checks, detokenisation, streaming. This runner maps each SchedulerOutput onto the core:

* new request     -> core `Request` (params from the server config + SamplingParams +
                     vllm_xargs), pages = vLLM's block ids of its (only) KV group;
* finished/aborted -> dropped (vLLM frees its blocks);
* preempted       -> pages dropped, state kept; on resume it gets its new blocks and
                     `needs_full_pass` (the core recomputes every row once);
* every scheduled request -> one denoising step (`StepRunner.step` on the whole batch);
  the sampled tokens returned to vLLM are the step's `new_final_tokens`, the leftmost
  contiguous final prefix, so streaming emits it as soon as it is final.

KV memory: one KV-cache "layer" (`POOL_LAYER`) whose page is a whole core page (K and V of
every layer for this rank's heads, plus the layer inputs x_0..x_L that Elastic-Cache and
SPA-Cache keep), so vLLM's block count accounts for everything the core stores. The
tensors are allocated here from the number of blocks vLLM computed; block id = page id.
A step computes at most `max_num_batched_tokens` rows per pass (the StepRunner splits a
larger batch), which bounds the activation memory that the GPU runner's profile run
measures.

Weights: the checkpoint's, or with `--load-format dummy` random weights of its shape
(`LLaDAModel.random`, seeded by `--seed`), for speed measurements without a checkpoint.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from vllm.v1.kv_cache_interface import FullAttentionSpec
from vllm.v1.outputs import ModelRunnerOutput

from model_executor.llada import LLaDAModel
from model_executor.parallel import TensorParallel
from model_executor.tokenizer import folder_special_ids
from vllm_elastic.core.kv_store import PagedKVStore, StoreLayout
from vllm_elastic.core.params import GenerationParams
from vllm_elastic.core.request import Request
from vllm_elastic.core.step_runner import StepRunner

from .metrics import STAT_KEYS, request_stats_vector
from .model import LLaDAModelLM
from .request_params import request_params, server_defaults

from vllm.logger import init_logger

logger = init_logger("vllm." + __name__)  # under vLLM's configured "vllm" logger

POOL_LAYER = "vllm_elastic.kv_pool"
# Positions of each dummy request of the profile pass (the keys per request do not change
# the activation memory: attention streams over them).
PROFILE_REQUEST_LEN = 1024


def vllm_tensor_parallel() -> TensorParallel:
    """The core's TensorParallel over vLLM's tensor-parallel group (any executor)."""
    from vllm.distributed.parallel_state import get_tp_group

    g = get_tp_group()
    if g.world_size == 1:
        return TensorParallel()
    return TensorParallel(rank=g.rank_in_group, world_size=g.world_size, group=g.device_group,
                          all_reduce_fn=g.all_reduce,
                          all_gather_fn=lambda x: g.all_gather(x.contiguous(), dim=-1))


def model_bytes(model: LLaDAModel) -> int:
    """Bytes of this rank's weights."""
    tensors = [model.wte, model.head, model.ln_f]
    for layer in model.layers:
        tensors += [layer.attn_norm, layer.w_qkv, layer.w_o, layer.ff_norm, layer.w_gate_up,
                    layer.w_down]
    seen: set[int] = set()
    total = 0
    for t in tensors:
        if t.data_ptr() not in seen:  # tied embeddings count once
            seen.add(t.data_ptr())
            total += t.numel() * t.element_size()
    return total


class ElasticRunnerMixin:
    """Put before vLLM's runner class in the bases; uses its vllm_config, model_config,
    cache_config, scheduler_config and device."""

    # -- model ---------------------------------------------------------------------------

    def load_model(self, load_dummy_weights: bool = False, **_: Any) -> None:
        from vllm.config import set_current_vllm_config

        from model_executor.config import LLaDAConfig

        folder = self.model_config.model
        dummy = load_dummy_weights or str(self.vllm_config.load_config.load_format) == "dummy"
        dtype = self.model_config.dtype
        with set_current_vllm_config(self.vllm_config):
            self.model = LLaDAModelLM(vllm_config=self.vllm_config)
        tp = vllm_tensor_parallel()
        if dummy:
            logger.info("vllm-elastic: random LLaDA weights of %s's shape (dtype %s)",
                        folder, dtype)
            self.core_model = LLaDAModel.random(
                LLaDAConfig.from_folder(folder), dtype=dtype, device=self.device, tp=tp,
                seed=int(self.model_config.seed or 0))
        else:
            logger.info("vllm-elastic: loading LLaDA %s (dtype %s)", folder, dtype)
            self.core_model = LLaDAModel.from_pretrained(folder, dtype=dtype,
                                                         device=self.device, tp=tp)
        self.model.core = self.core_model
        self.model_memory_usage = model_bytes(self.core_model)
        self.special = folder_special_ids(
            folder, need_tokenizer=not self.model_config.skip_tokenizer_init)
        self.base_params = server_defaults(self.vllm_config)
        self.core_requests: dict[str, Request] = {}
        self.store: PagedKVStore | None = None
        self.step_runner: StepRunner | None = None

    def get_model(self):
        return self.model

    @property
    def max_pass_rows(self) -> int:
        """Rows one pass may compute (the StepRunner splits larger batches)."""
        return max(int(self.scheduler_config.max_num_batched_tokens),
                   int(self.model_config.max_model_len))

    # -- KV cache --------------------------------------------------------------------------

    def _layout(self, num_pages: int) -> StoreLayout:
        cfg = self.core_model.cfg
        return StoreLayout(
            num_layers=cfg.n_layers, num_pages=num_pages,
            page_size=self.cache_config.block_size,
            num_heads=cfg.n_heads // self.core_model.tp.world_size, head_dim=cfg.head_dim,
            hidden_size=cfg.d_model, keep_layer_inputs=True,
            dtype=self.core_model.dtype, device=self.core_model.device)

    def get_kv_cache_spec(self) -> dict[str, Any]:
        layout = self._layout(1)
        spec = FullAttentionSpec(
            block_size=layout.page_size, num_kv_heads=layout.num_heads,
            head_size=layout.head_dim, dtype=layout.dtype, non_causal=True,
            page_size_padded=layout.bytes_per_page())
        return {POOL_LAYER: spec}

    def initialize_kv_cache(self, kv_cache_config, *args: Any, **kwargs: Any) -> None:
        self.kv_cache_config = kv_cache_config
        layout = self._layout(kv_cache_config.num_blocks)
        self.store = PagedKVStore.from_tensors(layout, *PagedKVStore.allocate_tensors(layout))
        self.step_runner = StepRunner(self.core_model, self.store,
                                      max_rows=self.max_pass_rows)
        self.kv_caches = list(self.store.k) + list(self.store.v) + list(self.store.x or [])
        logger.info("vllm-elastic: KV pool of %d pages x %d positions (%.2f GiB), "
                    "passes of at most %d rows", layout.num_pages, layout.page_size,
                    layout.num_pages * layout.bytes_per_page() / 2 ** 30, self.max_pass_rows)

    @torch.inference_mode()
    def profile_pass(self, reserve_bytes: int = 0) -> int:
        """The largest pass a step runs: a full pass of `max_pass_rows` rows (dummy
        requests of at most `PROFILE_REQUEST_LEN` positions, all on the same scratch
        pages), with `reserve_bytes` held alongside; returns the rows computed. Its peak
        is the activation memory a memory profile must see."""
        model = self.core_model
        rows = self.max_pass_rows
        per = min(PROFILE_REQUEST_LEN, rows, int(self.model_config.max_model_len) - 1)
        gen = 32 if per > 64 else per // 2
        layout = self._layout(-(-per // self.cache_config.block_size))
        store = PagedKVStore(layout)
        runner = StepRunner(model, store, max_rows=rows, cuda_graphs=False)
        params = GenerationParams.from_dict({"policy": "elastic", "gen_length": gen,
                                             "block_length": gen, "stop_at_eos": False})
        rng = np.random.default_rng(0)
        pages = list(range(layout.num_pages))
        slot_map = store.slot_map(pages, per)
        requests = []
        for i in range(max(1, rows // per)):
            prompt = rng.integers(0, model.cfg.vocab_size, per - gen).tolist()
            r = Request(f"profile-{i}", prompt, params, self.special, device=model.device)
            r.pages, r.slot_map = pages, slot_map
            requests.append(r)
        reserve = torch.empty(reserve_bytes, dtype=torch.uint8, device=model.device)
        runner.step(requests)
        if model.device.type == "cuda":
            torch.cuda.synchronize(model.device)
        del reserve
        return sum(r.total_len for r in requests)

    # -- no vLLM forward passes --------------------------------------------------------------

    def warming_up_model(self) -> None:
        pass

    def capture_model(self) -> int:
        # The core captures its own CUDA graphs, one per pass geometry, as they recur.
        return 0

    def take_draft_token_ids(self):
        return None

    # -- the step ----------------------------------------------------------------------------

    def _set_pages(self, r: Request, block_ids: list[int]) -> None:
        r.pages = list(block_ids)
        r.slot_map = self.store.slot_map(r.pages, r.total_len)

    def _update_states(self, so) -> None:
        for rid in so.finished_req_ids:
            self.core_requests.pop(rid, None)
        for rid in (getattr(so, "preempted_req_ids", None) or ()):
            r = self.core_requests.get(rid)
            if r is not None:  # its blocks are gone; keep the canvas and the commits
                r.pages, r.slot_map = [], None
        for nr in so.scheduled_new_reqs:
            r = self.core_requests.get(nr.req_id)
            if r is None:
                params = request_params(nr.sampling_params, self.base_params)
                r = Request(nr.req_id, list(nr.prompt_token_ids), params, self.special,
                            device=self.core_model.device)
                self.core_requests[nr.req_id] = r
            else:  # re-admitted as new after losing its blocks
                r.needs_full_pass = True
            self._set_pages(r, nr.block_ids[0])
        cr = so.scheduled_cached_reqs
        for i, rid in enumerate(cr.req_ids):
            r = self.core_requests.get(rid)
            if r is None:
                raise RuntimeError(f"vllm-elastic: unknown request {rid!r} resumed")
            nb = cr.new_block_ids[i]
            if rid in cr.resumed_req_ids:
                self._set_pages(r, nb[0])
                r.needs_full_pass = True
            elif nb is not None and nb[0]:
                self._set_pages(r, r.pages + list(nb[0]))

    @torch.inference_mode()
    def execute_model(self, scheduler_output, intermediate_tensors=None) -> ModelRunnerOutput:
        so = scheduler_output
        self._update_states(so)
        req_ids = list(so.num_scheduled_tokens)
        batch = [self.core_requests[rid] for rid in req_ids
                 if not self.core_requests[rid].finished]
        before = [request_stats_vector(r.stats) for r in batch]
        outputs = {o.request_id: o for o in self.step_runner.step(batch)} if batch else {}
        stats = dict.fromkeys(STAT_KEYS, 0)
        for r, b in zip(batch, before):
            for k, v in request_stats_vector(r.stats).items():
                stats[k] += v - b[k]
        sampled = [outputs[rid].new_final_tokens if rid in outputs else []
                   for rid in req_ids]
        out = ModelRunnerOutput(req_ids=req_ids,
                                req_id_to_index={rid: i for i, rid in enumerate(req_ids)},
                                sampled_token_ids=sampled)
        out.elastic_stats = stats  # read by ElasticScheduler.update_from_output
        return out
