"""vLLM GPU worker and model runner for LLaDA (vLLM's CUDA platform).

What differs from the CPU adapters is memory: vLLM sizes the KV pool from
`gpu_memory_utilization` minus the weights and the peak of a profile run, so
`profile_run` runs the largest pass a step can compute (`max_pass_rows` rows: the step
runner splits larger batches) on a scratch store, with the bound of the core's CUDA-graph
pool held alongside. It also compiles the Triton kernels before the server takes requests.
The step itself is the core's fused path (Triton kernels, CUDA graphs per pass geometry);
vLLM's own warm-up, compilation and graph capture do not apply (LLaDA has no vLLM forward).
"""

from __future__ import annotations

import gc

import numpy as np
import torch
from vllm.v1.worker.gpu_model_runner import GPUModelRunner
from vllm.v1.worker.gpu_worker import Worker
from vllm.v1.worker.worker_base import CompilationTimes

from vllm_elastic.core.cuda_graphs import GRAPH_MAX_BYTES
from vllm_elastic.core.kv_store import PagedKVStore
from vllm_elastic.core.params import GenerationParams
from vllm_elastic.core.request import Request
from vllm_elastic.core.step_runner import StepRunner

from .model_runner import ElasticRunnerMixin

# Positions of each request of the profile pass (keys per request do not change the
# activation memory: attention streams over the keys).
_PROFILE_REQUEST_LEN = 1024


class ElasticGPUModelRunner(ElasticRunnerMixin, GPUModelRunner):
    @torch.inference_mode()
    def profile_run(self) -> None:
        """One full pass of `max_pass_rows` rows (the largest a step runs), with every
        dummy request on the same scratch pages."""
        model = self.core_model
        rows = self.max_pass_rows
        per = min(_PROFILE_REQUEST_LEN, rows, int(self.model_config.max_model_len) - 1)
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
        graphs = model.device.type == "cuda" and not model.tp.enabled
        pool = torch.empty(GRAPH_MAX_BYTES if graphs else 0, dtype=torch.uint8,
                           device=model.device)
        runner.step(requests)
        torch.cuda.synchronize(model.device)
        del pool, runner, store, requests
        gc.collect()
        torch.cuda.empty_cache()


class ElasticGPUWorker(Worker):
    def _make_model_runner(self) -> ElasticGPUModelRunner:
        # vLLM 0.32+: the factory Worker.init_device calls.
        return ElasticGPUModelRunner(self.vllm_config, self.device)

    def init_device(self) -> None:
        super().init_device()
        if not isinstance(self.model_runner, ElasticGPUModelRunner):
            # vLLM <= 0.26 builds its runner inline in init_device: swap ours in.
            self.model_runner = self._make_model_runner()

    def compile_or_warm_up_model(self) -> CompilationTimes:
        # Nothing of vLLM's to compile, capture or warm up: the profile run compiled the
        # core's kernels, and the core captures its graphs as pass geometries recur.
        return CompilationTimes(language_model=0.0, encoder=0.0)
