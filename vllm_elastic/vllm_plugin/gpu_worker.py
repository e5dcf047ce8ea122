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
from typing import Any

import torch
from vllm.v1.worker.gpu_model_runner import GPUModelRunner
from vllm.v1.worker.gpu_worker import Worker
from vllm.v1.worker.worker_base import CompilationTimes

from vllm_elastic.core.fused.graphs import GRAPH_MAX_BYTES

from . import compat
from .model_runner import ElasticRunnerMixin


class ElasticGPUModelRunner(ElasticRunnerMixin, GPUModelRunner):
    def profile_run(self, *args: Any, **kwargs: Any) -> None:  # 0.32: randomize_inputs
        model = self.core_model
        graphs = model.device.type == "cuda" and not model.tp.enabled
        self.profile_pass(reserve_bytes=GRAPH_MAX_BYTES if graphs else 0)
        gc.collect()
        torch.cuda.empty_cache()


class ElasticGPUWorker(Worker):
    def _make_model_runner(self) -> ElasticGPUModelRunner:
        # vLLM 0.32+: the factory Worker.init_device calls.
        return ElasticGPUModelRunner(self.vllm_config, self.device)

    def init_device(self) -> None:
        super().init_device()
        compat.install_runner(self, ElasticGPUModelRunner, self._make_model_runner)

    def compile_or_warm_up_model(self) -> CompilationTimes:
        # Nothing of vLLM's to compile, capture or warm up: the profile run compiled the
        # core's kernels, and the core captures its graphs as pass geometries recur.
        return CompilationTimes(language_model=0.0, encoder=0.0)

    def elastic_pass_counts(self) -> dict[str, int]:
        """The core's fused passes so far: eager, captured as CUDA graphs, replayed
        (`LLM.collective_rpc("elastic_pass_counts")`)."""
        runner = self.model_runner.step_runner
        return runner.pass_counts() if runner is not None else {}
