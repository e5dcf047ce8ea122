"""vLLM CPU worker whose model runner drives the engine core."""

from __future__ import annotations

from vllm.v1.worker.cpu_worker import CPUWorker

from .model_runner import ElasticModelRunner


class ElasticCPUWorker(CPUWorker):
    def init_device(self) -> None:
        # CPUWorker builds its runner inline (no factory hook): build it, then swap ours in.
        super().init_device()
        self.model_runner = ElasticModelRunner(self.vllm_config, self.device)
