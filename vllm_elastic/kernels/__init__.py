"""Triton kernels for the engine core's hot paths (CUDA only).

Each kernel computes the same function as a plain torch version that stays the CPU path
and the test reference:

| kernel | torch reference |
|---|---|
| `paged_attention_triton` | `core.attention.paged_attention_torch` |
| `rms_norm_triton`, `add_rms_norm_triton` | (`h + o`, then) `model_executor.layers.rms_norm` |
| `silu_mul_triton` | `F.silu(gate) * up` |
| `rope_kv_write_triton` | `RotaryEmbedding.apply` on q and k + `PagedKVStore.write_kv` |
| `probe_old` / `probe_now` | `core.attention.attention_probs` + Elastic's drift test and window mass |

Importing this package without Triton leaves every name None (callers fall back to torch).
`enabled(t)` says whether the kernels should run on tensor `t` (CUDA, Triton present, not
turned off with `core.attention.use_kernels(False)`).
"""

from __future__ import annotations

try:
    import triton  # noqa: F401
except Exception:  # noqa: BLE001 - no Triton (CPU CI): every kernel is None
    paged_attention_triton = None
    paged_attention_meta = None
    rms_norm_triton = None
    add_rms_norm_triton = None
    silu_mul_triton = None
    rope_kv_write_triton = None
    probe_old = None
    probe_now = None
    probe_max_rows = None
    drift_from_sums = None
    AVAILABLE = False
else:
    from .attention_probe import drift_from_sums, probe_max_rows, probe_now, probe_old
    from .paged_attention import paged_attention_meta, paged_attention_triton
    from .rms_norm import add_rms_norm_triton, rms_norm_triton
    from .silu_mul import silu_mul_triton
    from .rope_kv import rope_kv_write_triton
    AVAILABLE = True


def enabled(t) -> bool:
    """Kernels apply to tensor `t`: CUDA (or the interpreter, see below), Triton, not disabled."""
    import os

    from vllm_elastic.core.attention import kernels_disabled

    if not AVAILABLE or kernels_disabled():
        return False
    # VLLM_ELASTIC_TRITON_CPU=1 (with TRITON_INTERPRET=1): run them on CPU tensors in
    # Triton's interpreter (kernel development only; float32 only).
    return t.is_cuda or os.environ.get("VLLM_ELASTIC_TRITON_CPU") == "1"


__all__ = ["AVAILABLE", "add_rms_norm_triton", "drift_from_sums", "enabled", "paged_attention_meta", "paged_attention_triton",
           "probe_max_rows", "probe_now", "probe_old", "rms_norm_triton",
           "rope_kv_write_triton", "silu_mul_triton"]
