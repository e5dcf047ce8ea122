"""RMSNorm in one launch (Triton), rounding exactly like `model_executor.layers.rms_norm`.

Reference: `weight * (x.float() * rsqrt(mean(x.float()^2) + eps)).to(x.dtype)`: the
normalised row is rounded to the input dtype before the (input-dtype) weight multiply,
and the product rounded again. The torch version is six launches per call; this is one.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _rms_norm_kernel(x_ptr, w_ptr, y_ptr, n_cols, sx, sy, eps, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK)
    mask = offs < n_cols
    x = tl.load(x_ptr + row * sx + offs, mask=mask, other=0.0).to(tl.float32)
    inv = 1.0 / tl.sqrt(tl.sum(x * x, 0) / n_cols + eps)
    xn = (x * inv).to(y_ptr.dtype.element_ty)
    w = tl.load(w_ptr + offs, mask=mask, other=0.0)
    y = (w.to(tl.float32) * xn.to(tl.float32)).to(y_ptr.dtype.element_ty)
    tl.store(y_ptr + row * sy + offs, y, mask=mask)


def rms_norm_triton(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """x [rows, hidden] (last dim contiguous), weight [hidden] of x's dtype."""
    assert x.dim() == 2 and x.stride(1) == 1 and weight.dtype == x.dtype
    rows, n = x.shape
    y = torch.empty((rows, n), dtype=x.dtype, device=x.device)
    if rows:
        block = triton.next_power_of_2(n)
        _rms_norm_kernel[(rows,)](x, weight, y, n, x.stride(0), y.stride(0), eps,
                                  BLOCK=block, num_warps=8 if block >= 4096 else 4)
    return y


@triton.jit
def _add_rms_norm_kernel(h_ptr, o_ptr, w_ptr, hs_ptr, y_ptr, n_cols, eps,
                         BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK)
    mask = offs < n_cols
    a = tl.load(h_ptr + row * n_cols + offs, mask=mask, other=0.0)
    b = tl.load(o_ptr + row * n_cols + offs, mask=mask, other=0.0)
    hs = (a.to(tl.float32) + b.to(tl.float32)).to(hs_ptr.dtype.element_ty)
    tl.store(hs_ptr + row * n_cols + offs, hs, mask=mask)
    x = hs.to(tl.float32)
    inv = 1.0 / tl.sqrt(tl.sum(x * x, 0) / n_cols + eps)
    xn = (x * inv).to(y_ptr.dtype.element_ty)
    w = tl.load(w_ptr + offs, mask=mask, other=0.0)
    y = (w.to(tl.float32) * xn.to(tl.float32)).to(y_ptr.dtype.element_ty)
    tl.store(y_ptr + row * n_cols + offs, y, mask=mask)


def add_rms_norm_triton(h: torch.Tensor, o: torch.Tensor, weight: torch.Tensor, eps: float
                        ) -> tuple[torch.Tensor, torch.Tensor]:
    """Residual add then RMSNorm in one launch: returns (h + o, rms_norm(h + o, weight)),
    the sum rounded to h's dtype first, as `h = h + o; rms_norm(h, ...)` does."""
    assert h.shape == o.shape and h.dim() == 2 and h.dtype == o.dtype == weight.dtype
    h, o = h.contiguous(), o.contiguous()
    rows, n = h.shape
    hs = torch.empty_like(h)
    y = torch.empty_like(h)
    if rows:
        block = triton.next_power_of_2(n)
        _add_rms_norm_kernel[(rows,)](h, o, weight, hs, y, n, eps, BLOCK=block,
                                      num_warps=8 if block >= 4096 else 4)
    return hs, y
