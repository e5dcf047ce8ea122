"""SwiGLU's `silu(gate) * up` in one launch (Triton), from the fused gate/up GEMM output.

Same rounding as torch: silu computed in float32 and rounded to the input dtype, then
the product computed in float32 and rounded (torch's two bf16 ops).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _silu_mul_kernel(gu_ptr, y_ptr, n_cols, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n_cols
    g = tl.load(gu_ptr + row * 2 * n_cols + offs, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(gu_ptr + row * 2 * n_cols + n_cols + offs, mask=mask, other=0.0)
    s = (g / (1.0 + tl.exp(-g))).to(y_ptr.dtype.element_ty)
    y = (s.to(tl.float32) * u.to(tl.float32)).to(y_ptr.dtype.element_ty)
    tl.store(y_ptr + row * n_cols + offs, y, mask=mask)


def silu_mul_triton(gate_up: torch.Tensor) -> torch.Tensor:
    """gate_up [rows, 2 * m] (gate first) -> silu(gate) * up [rows, m]."""
    assert gate_up.dim() == 2 and gate_up.is_contiguous() and gate_up.shape[1] % 2 == 0
    rows, two_m = gate_up.shape
    m = two_m // 2
    y = torch.empty((rows, m), dtype=gate_up.dtype, device=gate_up.device)
    if rows:
        block = 1024
        _silu_mul_kernel[(rows, triton.cdiv(m, block))](gate_up, y, m, BLOCK=block,
                                                          num_warps=4)
    return y
