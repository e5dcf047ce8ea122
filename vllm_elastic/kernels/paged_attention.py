"""Bidirectional attention of ragged query rows over each request's paged K/V (Triton).

Same function as `vllm_elastic.core.attention.paged_attention_torch` (its reference and CPU
path): request r's query rows `q[row_offsets[r]:row_offsets[r+1]]` attend, without a causal
mask, to the K/V of its positions `slot_table[r, :kv_lens[r]]` in the flat slot pools.

Flash-style: one program per (request, block of BLOCK_M rows, head) streams the request's
keys in blocks of BLOCK_N with an online softmax, so no score matrix is materialised. Keys
are gathered through the slot table (one 2*head_dim-byte row per key and head), so pages
of any size and order work. Row blocks past a request's rows do nothing; the grid's
row-block axis is sized by the batch's longest request.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl


@triton.jit
def _paged_attn_kernel(
    q_ptr, k_ptr, v_ptr, o_ptr, row_off_ptr, kv_len_ptr, slot_ptr,
    sq_r, sq_h, sk_s, sk_h, so_r, so_h, s_slot,
    qk_scale,
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    IEEE: tl.constexpr,
):
    r = tl.program_id(0)
    mb = tl.program_id(1)
    h = tl.program_id(2)
    row0 = tl.load(row_off_ptr + r)
    row1 = tl.load(row_off_ptr + r + 1)
    m_start = row0 + mb * BLOCK_M
    if m_start < row1:
        offs_m = m_start + tl.arange(0, BLOCK_M)
        mask_m = offs_m < row1
        offs_d = tl.arange(0, HEAD_DIM)
        q = tl.load(q_ptr + offs_m[:, None].to(tl.int64) * sq_r + h * sq_h + offs_d[None, :],
                    mask=mask_m[:, None], other=0.0)
        kv_len = tl.load(kv_len_ptr + r)
        m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
        l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
        acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
        slot_row = slot_ptr + r.to(tl.int64) * s_slot
        for n0 in range(0, kv_len, BLOCK_N):
            offs_n = n0 + tl.arange(0, BLOCK_N)
            mask_n = offs_n < kv_len
            slots = tl.load(slot_row + offs_n, mask=mask_n, other=0).to(tl.int64)
            kv_off = slots[:, None] * sk_s + h * sk_h + offs_d[None, :]
            k = tl.load(k_ptr + kv_off, mask=mask_n[:, None], other=0.0)
            if IEEE:
                s = tl.dot(q, tl.trans(k), input_precision="ieee")
            else:
                s = tl.dot(q, tl.trans(k))
            s = s * qk_scale
            s = tl.where(mask_n[None, :], s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, 1))
            alpha = tl.exp2(m_i - m_new)
            p = tl.exp2(s - m_new[:, None])
            l_i = l_i * alpha + tl.sum(p, 1)
            v = tl.load(v_ptr + kv_off, mask=mask_n[:, None], other=0.0)
            if IEEE:
                acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision="ieee")
            else:
                acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
            m_i = m_new
        out = acc / l_i[:, None]
        tl.store(o_ptr + offs_m[:, None].to(tl.int64) * so_r + h * so_h + offs_d[None, :],
                 out.to(o_ptr.dtype.element_ty), mask=mask_m[:, None])


def paged_attention_meta(q: torch.Tensor, row_offsets: torch.Tensor, kv_lens: torch.Tensor,
                         slot_table: torch.Tensor, k_cache: torch.Tensor,
                         v_cache: torch.Tensor, max_rows: int) -> torch.Tensor:
    """q [rows, heads, dim]; row_offsets [R+1] / kv_lens [R] int32; slot_table [R, max_len]
    int32; k_cache / v_cache [slots, heads, dim] contiguous. Returns [rows, heads, dim]."""
    rows, heads, dim = q.shape
    assert dim & (dim - 1) == 0 and dim >= 16, "head_dim must be a power of two >= 16"
    assert k_cache.stride(2) == 1 and v_cache.stride() == k_cache.stride()
    if q.stride(2) != 1:
        q = q.contiguous()
    out = torch.empty_like(q)
    if rows == 0:
        return out
    num_req = kv_lens.shape[0]
    # Small row blocks for window-only steps (more programs), larger for full passes.
    block_m = 16 if max_rows <= 64 else 64
    block_n = 64
    ieee = q.dtype == torch.float32
    grid = (num_req, triton.cdiv(max_rows, block_m), heads)
    _paged_attn_kernel[grid](
        q, k_cache, v_cache, out, row_offsets, kv_lens, slot_table,
        q.stride(0), q.stride(1), k_cache.stride(0), k_cache.stride(1),
        out.stride(0), out.stride(1), slot_table.stride(0),
        (1.0 / math.sqrt(dim)) * 1.4426950408889634,
        HEAD_DIM=dim, BLOCK_M=block_m, BLOCK_N=block_n, IEEE=ieee,
        num_warps=4 if block_m <= 16 else 4, num_stages=2,
    )
    return out


def paged_attention_triton(q: torch.Tensor, batch, k_cache: torch.Tensor,
                           v_cache: torch.Tensor) -> torch.Tensor:
    """Drop-in for `paged_attention_torch(q, batch, k_cache, v_cache)` (a `RaggedBatch`)."""
    meta = batch.device_meta(q.device)
    return paged_attention_meta(q, meta["row_offsets"], meta["kv_lens"], meta["slot_table"],
                                k_cache, v_cache, meta["max_rows"])
