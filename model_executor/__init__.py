"""The LLaDA model in plain torch (no vLLM import): config, checkpoint, layers, tokenizer."""

from .config import CheckpointError, LLaDAConfig, llada_8b_config
from .llada import LLaDALayer, LLaDAModel
from .parallel import TensorParallel

__all__ = ["CheckpointError", "LLaDAConfig", "LLaDALayer", "LLaDAModel", "TensorParallel",
           "llada_8b_config"]
