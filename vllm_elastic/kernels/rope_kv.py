"""RoPE on q and k, and the K/V page write, in one launch (Triton).

Input: the fused projection `qkv` [rows, 3, heads, dim] (pre-RoPE), the rows' absolute
positions and their slots. Output: post-RoPE q [rows, heads, dim]; post-RoPE k and v are
written straight into the layer's flat slot pools (`k_cache[slot] = k`). Same rounding as
`model_executor.layers.RotaryEmbedding.apply` (rotation in float32, split-half
`rotate_half`, one cast back) followed by `PagedKVStore.write_kv`. Rows whose slot is
negative (a padded batch's filler rows) write no K/V. The torch path is ~20 launches per
layer; this is one.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _rope_kv_kernel(qkv_ptr, pos_ptr, slot_ptr, cos_ptr, sin_ptr, q_ptr, k_ptr, v_ptr,
                    kprev_ptr, n_heads, s_row, s_part, s_head, s_cos, sq_row, sk_slot,
                    HALF: tl.constexpr, BLOCK_H: tl.constexpr, WRITE_KV: tl.constexpr,
                    SAVE_PREV: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    hb = tl.program_id(1)
    offs_h = hb * BLOCK_H + tl.arange(0, BLOCK_H)
    offs_d = tl.arange(0, HALF)
    mask = (offs_h < n_heads)[:, None]
    pos = tl.load(pos_ptr + row).to(tl.int64)
    c1 = tl.load(cos_ptr + pos * s_cos + offs_d)[None, :]
    c2 = tl.load(cos_ptr + pos * s_cos + HALF + offs_d)[None, :]
    s1 = tl.load(sin_ptr + pos * s_cos + offs_d)[None, :]
    s2 = tl.load(sin_ptr + pos * s_cos + HALF + offs_d)[None, :]
    base = qkv_ptr + row * s_row + offs_h[:, None] * s_head + offs_d[None, :]
    # q
    x1 = tl.load(base, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(base + HALF, mask=mask, other=0.0).to(tl.float32)
    qo = q_ptr + row * sq_row + offs_h[:, None] * (2 * HALF) + offs_d[None, :]
    tl.store(qo, (x1 * c1 + (-x2) * s1).to(q_ptr.dtype.element_ty), mask=mask)
    tl.store(qo + HALF, (x2 * c2 + x1 * s2).to(q_ptr.dtype.element_ty), mask=mask)
    if WRITE_KV:
        slot = tl.load(slot_ptr + row).to(tl.int64)
        if slot >= 0:
            ko = slot * sk_slot + offs_h[:, None] * (2 * HALF) + offs_d[None, :]
            if SAVE_PREV:  # the slot's K before this write (Elastic-Cache's old keys)
                po = kprev_ptr + row * sk_slot + offs_h[:, None] * (2 * HALF) + offs_d[None, :]
                tl.store(po, tl.load(k_ptr + ko, mask=mask), mask=mask)
                tl.store(po + HALF, tl.load(k_ptr + ko + HALF, mask=mask), mask=mask)
            y1 = tl.load(base + s_part, mask=mask, other=0.0).to(tl.float32)
            y2 = tl.load(base + s_part + HALF, mask=mask, other=0.0).to(tl.float32)
            tl.store(k_ptr + ko, (y1 * c1 + (-y2) * s1).to(k_ptr.dtype.element_ty), mask=mask)
            tl.store(k_ptr + ko + HALF, (y2 * c2 + y1 * s2).to(k_ptr.dtype.element_ty),
                     mask=mask)
            z1 = tl.load(base + 2 * s_part, mask=mask, other=0.0)
            z2 = tl.load(base + 2 * s_part + HALF, mask=mask, other=0.0)
            tl.store(v_ptr + ko, z1, mask=mask)
            tl.store(v_ptr + ko + HALF, z2, mask=mask)

def rope_kv_write_triton(qkv: torch.Tensor, positions: torch.Tensor, slots: torch.Tensor | None,
                         cos: torch.Tensor, sin: torch.Tensor, k_cache: torch.Tensor | None,
                         v_cache: torch.Tensor | None, k_prev: torch.Tensor | None = None
                         ) -> torch.Tensor:
    """qkv [rows, 3, heads, dim] (dim contiguous); positions/slots [rows]; cos/sin
    [max_pos, dim] float32; k_cache/v_cache [slots, heads, dim] contiguous (None with
    slots None: only q is computed; slot < 0: no K/V for that row). `k_prev` [rows,
    heads, dim], if given, receives each written slot's K from before the write. Returns
    post-RoPE q [rows, heads, dim]."""
    rows, three, heads, dim = qkv.shape
    assert three in (1, 3) and qkv.stride(3) == 1 and dim % 2 == 0
    half = dim // 2
    assert half & (half - 1) == 0, "head_dim / 2 must be a power of two"
    q = torch.empty((rows, heads, dim), dtype=qkv.dtype, device=qkv.device)
    if rows == 0:
        return q
    write = k_cache is not None
    assert three == 3 or not write
    if write:
        assert k_cache.is_contiguous() and v_cache.is_contiguous()
        assert k_cache.dtype == qkv.dtype
    block_h = min(triton.next_power_of_2(heads), 8)
    grid = (rows, triton.cdiv(heads, block_h))
    _rope_kv_kernel[grid](
        qkv, positions, slots if write else positions, cos, sin, q,
        k_cache if write else q, v_cache if write else q, k_prev if k_prev is not None else q,
        heads, qkv.stride(0), qkv.stride(1), qkv.stride(2), cos.stride(0), q.stride(0),
        k_cache.stride(0) if write else 0,
        HALF=half, BLOCK_H=block_h, WRITE_KV=write, SAVE_PREV=k_prev is not None,
        num_warps=2,
    )
    return q
