"""The second half of an LLaDA block with fused kernels (the fused pass on CUDA).

Mirrors `model_executor.llada.LLaDALayer.finish` exactly (same GEMMs, same rounding
points) with residual add + RMSNorm and SwiGLU as one launch each. Tensor parallelism is
kept: the same all-reduces in the same places.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .rms_norm import add_rms_norm_triton
from .silu_mul import silu_mul_triton


def finish(layer, h: torch.Tensor, attn: torch.Tensor) -> torch.Tensor:
    """`LLaDALayer.finish` with residual add + RMSNorm and silu(gate) * up as one launch
    each (6 launches instead of ~12)."""
    o = F.linear(attn.reshape(h.shape[0], -1), layer.w_o)
    h, x = add_rms_norm_triton(h, layer.tp.all_reduce(o), layer.ff_norm,
                               layer.cfg.rms_norm_eps)
    down = F.linear(silu_mul_triton(F.linear(x, layer.w_gate_up)), layer.w_down)
    return h + layer.tp.all_reduce(down)
