"""vLLM CPU worker and model runner for LLaDA (vLLM's CPU platform)."""

from __future__ import annotations

from typing import Any

from vllm.v1.worker.cpu_model_runner import CPUModelRunner
from vllm.v1.worker.cpu_worker import CPUWorker

from .model_runner import ElasticRunnerMixin


class ElasticCPUModelRunner(ElasticRunnerMixin, CPUModelRunner):
    def profile_run(self, *args: Any, **kwargs: Any) -> None:  # 0.32: randomize_inputs
        # vLLM's CPU worker sizes the KV pool from its memory setting, not from a profile.
        pass


class ElasticCPUWorker(CPUWorker):
    def init_device(self) -> None:
        # CPUWorker builds its runner inline (no factory hook): build it, then swap ours in.
        super().init_device()
        self.model_runner = ElasticCPUModelRunner(self.vllm_config, self.device)
