"""One LLaDA block's non-attention work with fused kernels (the runner's CUDA path).

Mirrors `model_executor.llada.LLaDALayer.qkv` / `.finish` exactly (same GEMMs, same
rounding points) with the two RMSNorms as one launch each and RoPE + K/V page write as
one launch (`rope_kv_write_triton`, called by the runner once the Elastic hooks have read
the old K). Tensor parallelism is kept: the same all-reduces in the same places.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .rms_norm import add_rms_norm_triton, rms_norm_triton
from .silu_mul import silu_mul_triton


def qkv_projection(layer, h: torch.Tensor) -> torch.Tensor:
    """Pre-RoPE fused projection of the rows: [rows, 3, heads_local, head_dim]."""
    x = rms_norm_triton(h, layer.attn_norm, layer.cfg.rms_norm_eps)
    return F.linear(x, layer.w_qkv).view(h.shape[0], 3, layer.n_heads, layer.head_dim)


def query_projection(layer, h: torch.Tensor) -> torch.Tensor:
    """Pre-RoPE q only: [rows, 1, heads_local, head_dim]."""
    x = rms_norm_triton(h, layer.attn_norm, layer.cfg.rms_norm_eps)
    n = layer.n_heads * layer.head_dim
    return F.linear(x, layer.w_qkv[:n]).view(h.shape[0], 1, layer.n_heads, layer.head_dim)


def finish(layer, h: torch.Tensor, attn: torch.Tensor) -> torch.Tensor:
    """`LLaDALayer.finish` with residual add + RMSNorm and silu(gate) * up as one launch
    each (6 launches instead of ~12)."""
    o = F.linear(attn.reshape(h.shape[0], -1), layer.w_o)
    h, x = add_rms_norm_triton(h, layer.tp.all_reduce(o), layer.ff_norm,
                               layer.cfg.rms_norm_eps)
    down = F.linear(silu_mul_triton(F.linear(x, layer.w_gate_up)), layer.w_down)
    return h + layer.tp.all_reduce(down)
