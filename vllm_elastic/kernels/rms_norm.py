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


@triton.jit
def _norm_rows_kernel(h_ptr, w_ptr, y_ptr, xc_ptr, xslot_ptr, oldrow_ptr, n_rows, n_cols,
                      sh, sx, eps, HAS_X: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK)
    mask = offs < n_cols
    w = tl.load(w_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    a = tl.load(h_ptr + row * sh + offs, mask=mask, other=0.0)
    x = a.to(tl.float32)
    inv = 1.0 / tl.sqrt(tl.sum(x * x, 0) / n_cols + eps)
    xn = (x * inv).to(y_ptr.dtype.element_ty)
    tl.store(y_ptr + row * n_cols + offs, (w * xn.to(tl.float32)).to(y_ptr.dtype.element_ty),
             mask=mask)
    if HAS_X:
        slot = tl.load(xslot_ptr + row).to(tl.int64)
        if slot >= 0:
            j = tl.load(oldrow_ptr + row).to(tl.int64)
            if j >= 0:  # this row's previous input, normed, before it is overwritten
                o = tl.load(xc_ptr + slot * sx + offs, mask=mask, other=0.0).to(tl.float32)
                oinv = 1.0 / tl.sqrt(tl.sum(o * o, 0) / n_cols + eps)
                on = (o * oinv).to(y_ptr.dtype.element_ty)
                tl.store(y_ptr + (n_rows + j) * n_cols + offs,
                         (w * on.to(tl.float32)).to(y_ptr.dtype.element_ty), mask=mask)
            tl.store(xc_ptr + slot * sx + offs, a, mask=mask)


def norm_rows_triton(h: torch.Tensor, weight: torch.Tensor, eps: float,
                     x_cache: torch.Tensor | None, x_slot: torch.Tensor | None,
                     old_of_row: torch.Tensor | None, n_old: int) -> torch.Tensor:
    """A layer's input norm for every row, with the layer-input cache in the same pass.

    Returns y [rows + n_old, hidden]: y[i] = rms_norm(h[i]); and where x_cache is given,
    for each row i with x_slot[i] >= 0: if old_of_row[i] = j >= 0, y[rows + j] =
    rms_norm(x_cache[x_slot[i]]) (the row's input of the previous step, read before it
    is replaced), then x_cache[x_slot[i]] = h[i]. One program per row reads and writes
    its own slot, so the old input is never raced by the write."""
    assert h.dim() == 2 and h.stride(1) == 1 and weight.dtype == h.dtype
    rows, n = h.shape
    y = torch.empty((rows + n_old, n), dtype=h.dtype, device=h.device)
    if rows:
        has_x = x_cache is not None
        block = triton.next_power_of_2(n)
        _norm_rows_kernel[(rows,)](
            h, weight, y, x_cache if has_x else h, x_slot if has_x else h,
            old_of_row if has_x else h, rows, n, h.stride(0),
            x_cache.stride(0) if has_x else 0, eps, HAS_X=has_x, BLOCK=block,
            num_warps=8 if block >= 4096 else 4)
    return y
