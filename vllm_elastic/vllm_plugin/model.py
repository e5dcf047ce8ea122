"""The model class vLLM resolves for `architectures: ["LLaDAModelLM"]`.

It satisfies vLLM's model contract (text generation) but holds no weights: our model
runner (`model_runner.ElasticRunnerMixin`) loads the checkpoint into the engine core's
`model_executor.llada.LLaDAModel` and drives it with the core's `StepRunner`. vLLM's own
forward path is never used for LLaDA, so these methods refuse to run.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

_NOT_HERE = ("LLaDAModelLM is driven by vllm_elastic's model runner, not by vLLM's forward "
             "path; is the worker class vllm_elastic.vllm_plugin.cpu_worker.ElasticCPUWorker or gpu_worker.ElasticGPUWorker?")


class LLaDAModelLM(nn.Module):
    def __init__(self, *, vllm_config, prefix: str = ""):
        super().__init__()
        self.config = vllm_config.model_config.hf_config
        self.prefix = prefix
        self.core = None  # the engine core's LLaDAModel, set by the model runner

    def embed_input_ids(self, input_ids: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError(_NOT_HERE)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor,
                intermediate_tensors=None, inputs_embeds=None, **kwargs) -> torch.Tensor:
        raise NotImplementedError(_NOT_HERE)

    def compute_logits(self, hidden_states: torch.Tensor) -> torch.Tensor | None:
        raise NotImplementedError(_NOT_HERE)

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str] | None:
        # The engine core reads the checkpoint itself (sharded for tensor parallelism).
        return None
