"""Triton kernels for the engine core's hot paths (CUDA only).

Each kernel computes the same function as a plain torch version that stays the CPU path
and the test reference:

| kernel | torch reference |
|---|---|
| `paged_attention_blocks` (+ LSE) | `core.attention.paged_attention_torch` |
| `rms_norm_triton`, `add_rms_norm_triton` | (`h + o`, then) `model_executor.layers.rms_norm` |
| `norm_rows_triton` | `rms_norm` of rows and of cached inputs + `PagedKVStore.write_x` |
| `silu_mul_triton` | `F.silu(gate) * up` |
| `rope_kv_write_triton` | `RotaryEmbedding.apply` on q and k + `PagedKVStore.write_kv` |
| `probe_lse` / `drift_probe` | `core.attention.attention_probs` + Elastic's drift test and window mass |

The fused pass reaches them through `core.fused.ops`, which holds the torch versions.

Importing this package without Triton leaves every name None (callers fall back to torch).
`enabled(t)` says whether the kernels should run on tensor `t` (CUDA, Triton present, not
turned off with `use_kernels(False)`). `grid` (launch geometry, plain numpy) is importable
without Triton. Nothing here imports the engine core.
"""

from __future__ import annotations

_SWITCH = {"disabled": False}


def use_kernels(on: bool) -> None:
    """Turn the GPU kernels on or off (they are on by default where available)."""
    _SWITCH["disabled"] = not on


def kernels_disabled() -> bool:
    return _SWITCH["disabled"]


try:
    import triton  # noqa: F401  (present: the kernels below compile)
except Exception:  # noqa: BLE001 - no Triton (CPU CI): every kernel is None
    paged_attention_triton = None
    rms_norm_triton = None
    add_rms_norm_triton = None
    silu_mul_triton = None
    rope_kv_write_triton = None
    probe_lse = None
    drift_probe = None
    paged_attention_blocks = None
    norm_rows_triton = None
    AVAILABLE = False
else:
    from .attention_probe import drift_probe, probe_lse
    from .paged_attention import paged_attention_blocks, paged_attention_triton
    from .rms_norm import add_rms_norm_triton, norm_rows_triton, rms_norm_triton
    from .silu_mul import silu_mul_triton
    from .rope_kv import rope_kv_write_triton
    AVAILABLE = True


def enabled(t) -> bool:
    """Kernels apply to tensor `t`: CUDA (or the interpreter, see below), Triton, not disabled."""
    import os

    if not AVAILABLE or kernels_disabled():
        return False
    # VLLM_ELASTIC_TRITON_CPU=1 (with TRITON_INTERPRET=1): run them on CPU tensors in
    # Triton's interpreter (kernel development only; float32 only).
    return t.is_cuda or os.environ.get("VLLM_ELASTIC_TRITON_CPU") == "1"


__all__ = ["AVAILABLE", "add_rms_norm_triton", "drift_probe", "enabled", "kernels_disabled",
           "norm_rows_triton", "paged_attention_blocks", "paged_attention_triton", "probe_lse",
           "rms_norm_triton", "rope_kv_write_triton", "silu_mul_triton", "use_kernels"]
