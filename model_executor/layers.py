"""Building blocks of the LLaDA transformer, exactly as the published checkpoints compute."""

from __future__ import annotations

import torch
import torch.nn.functional as F

# The CPU GEMM takes another code path (another rounding) below this many rows, so a row's
# result would depend on how many rows share its call. Padding small calls up to it makes
# every row's result independent of its batch: a request's tokens do not depend on which
# requests it is batched with.
_CPU_MIN_GEMM_ROWS = 16


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm in float32, cast back to the input dtype, then scaled by the weight."""
    dtype = x.dtype
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return weight * xf.to(dtype)


class RotaryEmbedding:
    """Split-half RoPE (`rotate_half`) with sin/cos and the rotation in float32."""

    def __init__(self, head_dim: int, theta: float, max_positions: int, device: torch.device):
        inv_freq = 1.0 / (
            theta ** (torch.arange(0, head_dim, 2, device=device, dtype=torch.float) / head_dim)
        )
        t = torch.arange(max_positions, device=device, dtype=torch.float)
        freqs = torch.outer(t, inv_freq)
        emb = torch.cat((freqs, freqs), dim=-1)
        self.cos = emb.cos()  # [max_positions, head_dim]
        self.sin = emb.sin()

    def to(self, device: torch.device) -> "RotaryEmbedding":
        self.cos, self.sin = self.cos.to(device), self.sin.to(device)
        return self

    def apply(self, x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """x: [rows, heads, head_dim]; positions: [rows] absolute positions."""
        cos = self.cos[positions].unsqueeze(1)
        sin = self.sin[positions].unsqueeze(1)
        xf = x.float()
        half = xf.shape[-1] // 2
        rotated = torch.cat((-xf[..., half:], xf[..., :half]), dim=-1)
        return (xf * cos + rotated * sin).to(x.dtype)


def linear(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """x @ weight.T, with the same rounding for a row whatever the number of rows (CPU)."""
    n = x.shape[0]
    if 0 < n < _CPU_MIN_GEMM_ROWS and x.device.type == "cpu" and x.dim() == 2:
        padded = torch.zeros(_CPU_MIN_GEMM_ROWS, x.shape[1], dtype=x.dtype, device=x.device)
        padded[:n] = x
        return F.linear(padded, weight)[:n]
    return F.linear(x, weight)
