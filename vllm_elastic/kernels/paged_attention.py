"""Bidirectional attention of ragged query rows over each request's paged K/V (Triton).

Same function as `vllm_elastic.core.attention.paged_attention_torch` (its reference and CPU
path): request r's query rows `q[row_start[r]:row_start[r+1]]` attend, without a causal
mask, to the K/V of its positions `slot_table[r, :kv_lens[r]]` in the flat slot pools.

Flash-style: one program per (block of BLOCK_M rows of one request, head, key split)
streams its keys in blocks of BLOCK_N with an online softmax, so no score matrix is
materialised. Keys are gathered through the slot table (one 2*head_dim-byte row per key
and head), so pages of any size and order work. BLOCK_M follows the requests' row counts
(a window-only step has a few dozen rows a request: one block, so each request's K/V are
read once per head).

The grid is a flat list of row blocks (`block_req[i]`, `block_row[i]`: the request and
the first row of block i; request -1 = no work), so its size depends only on the number of
rows, not on the longest request: a step's launch has the same shape whatever the mix of
requests, which is what lets a CUDA graph replay it with new metadata. When that grid is
too small to fill the GPU (batch 1), the keys are split over `splits` programs whose
partial softmax states a second kernel combines (flash-decoding). Optionally the kernel
also writes each row's log-sum-exp (base 2, of the scaled scores) per head, from which
Elastic-Cache's probes get attention probabilities without a second softmax pass.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import triton
import triton.language as tl

from .grid import attention_block_m, row_blocks

LOG2E = 1.4426950408889634
BLOCK_N = 64


@triton.jit
def _paged_attn_kernel(
    q_ptr, k_ptr, v_ptr, o_ptr, lse_ptr, pm_ptr, pl_ptr, pacc_ptr,
    blk_req_ptr, blk_row_ptr, row_start_ptr, kv_len_ptr, slot_ptr,
    sq_r, sq_h, sk_s, sk_h, so_r, so_h, s_slot, n_heads, n_rows, qk_scale,
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    SPLITS: tl.constexpr, IEEE: tl.constexpr, WRITE_LSE: tl.constexpr,
):
    blk = tl.program_id(0)
    h = tl.program_id(1)
    sp = tl.program_id(2)
    r = tl.load(blk_req_ptr + blk)
    if r >= 0:
        m_start = tl.load(blk_row_ptr + blk)
        row1 = tl.load(row_start_ptr + r + 1)
        offs_m = m_start + tl.arange(0, BLOCK_M)
        mask_m = offs_m < row1
        offs_d = tl.arange(0, HEAD_DIM)
        q = tl.load(q_ptr + offs_m[:, None].to(tl.int64) * sq_r + h * sq_h + offs_d[None, :],
                    mask=mask_m[:, None], other=0.0)
        kv_len = tl.load(kv_len_ptr + r)
        if SPLITS == 1:
            k0 = 0
            k1 = kv_len
        else:
            chunk = tl.cdiv(tl.cdiv(kv_len, BLOCK_N), SPLITS) * BLOCK_N
            k0 = sp * chunk
            k1 = tl.minimum(kv_len, k0 + chunk)
        m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
        l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
        acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
        slot_row = slot_ptr + r.to(tl.int64) * s_slot
        for n0 in range(k0, k1, BLOCK_N):
            offs_n = n0 + tl.arange(0, BLOCK_N)
            mask_n = offs_n < k1
            slots = tl.load(slot_row + offs_n, mask=mask_n, other=0).to(tl.int64)
            kv_off = slots[:, None] * sk_s + h * sk_h + offs_d[None, :]
            k = tl.load(k_ptr + kv_off, mask=mask_n[:, None], other=0.0)
            if IEEE:
                s = tl.dot(q, tl.trans(k), input_precision="ieee")
            else:
                s = tl.dot(q, tl.trans(k))
            s = tl.where(mask_n[None, :], s * qk_scale, float("-inf"))
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
        rows64 = offs_m.to(tl.int64)
        if SPLITS == 1:
            out = acc / l_i[:, None]
            tl.store(o_ptr + rows64[:, None] * so_r + h * so_h + offs_d[None, :],
                     out.to(o_ptr.dtype.element_ty), mask=mask_m[:, None])
            if WRITE_LSE:
                tl.store(lse_ptr + rows64 * n_heads + h, m_i + tl.log2(l_i), mask=mask_m)
        else:  # partial state of this split: [splits, rows, heads] (+ head_dim)
            st = (sp * n_rows + rows64) * n_heads + h
            tl.store(pm_ptr + st, m_i, mask=mask_m)
            tl.store(pl_ptr + st, l_i, mask=mask_m)
            tl.store(pacc_ptr + st[:, None] * HEAD_DIM + offs_d[None, :], acc,
                     mask=mask_m[:, None])


@triton.jit
def _combine_kernel(o_ptr, lse_ptr, pm_ptr, pl_ptr, pacc_ptr, n_heads, n_rows, so_r, so_h,
                    HEAD_DIM: tl.constexpr, SPLITS: tl.constexpr, WRITE_LSE: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    h = tl.program_id(1)
    offs_s = tl.arange(0, SPLITS)
    offs_d = tl.arange(0, HEAD_DIM)
    st = (offs_s * n_rows + row) * n_heads + h
    m = tl.load(pm_ptr + st)
    l = tl.load(pl_ptr + st)
    m_max = tl.max(m, 0)
    w = tl.where(l > 0, tl.exp2(m - m_max), 0.0)  # splits past the keys hold nothing
    l_tot = tl.sum(w * l, 0)
    l_tot = tl.where(l_tot > 0, l_tot, 1.0)  # filler rows (no block wrote them): no NaN
    acc = tl.load(pacc_ptr + st[:, None] * HEAD_DIM + offs_d[None, :])
    out = tl.sum(w[:, None] * acc, 0) / l_tot
    tl.store(o_ptr + row * so_r + h * so_h + offs_d, out.to(o_ptr.dtype.element_ty))
    if WRITE_LSE:
        tl.store(lse_ptr + row * n_heads + h, m_max + tl.log2(l_tot))


def attention_splits(n_blocks: int, heads: int, max_len: int) -> int:
    """Key splits for a grid of n_blocks x heads programs: enough programs for the GPU,
    at least two key blocks a split."""
    s = 1
    while s < 8 and n_blocks * heads * s < 256 and max_len >= 2 * BLOCK_N * 2 * s:
        s *= 2
    return s


def paged_attention_blocks(q: torch.Tensor, block_req: torch.Tensor, block_row: torch.Tensor,
                           row_start: torch.Tensor, kv_lens: torch.Tensor,
                           slot_table: torch.Tensor, k_cache: torch.Tensor,
                           v_cache: torch.Tensor, block_m: int,
                           out: torch.Tensor | None = None, lse: torch.Tensor | None = None,
                           splits: int | None = None) -> torch.Tensor:
    """q [rows, heads, dim]; block_req / block_row [blocks] int32 (`row_blocks`, padded
    with request -1); row_start [R+1] / kv_lens [R] int32; slot_table [R, max_len] int32;
    k_cache / v_cache [slots, heads, dim]. Rows outside every block are left unwritten
    (split runs: filled with whatever the combine reads for them). `lse` [rows, heads]
    float32, if given, receives log2(sum_j 2^(s_j)) of the rows' scores
    s = q.k * log2(e) / sqrt(dim)."""
    rows, heads, dim = q.shape
    assert dim & (dim - 1) == 0 and dim >= 16, "head_dim must be a power of two >= 16"
    assert k_cache.stride(2) == 1 and v_cache.stride() == k_cache.stride()
    if q.stride(2) != 1:
        q = q.contiguous()
    if out is None:
        out = torch.empty_like(q)
    n_blocks = block_req.shape[0]
    if rows == 0 or n_blocks == 0:
        return out
    if splits is None:
        splits = attention_splits(n_blocks, heads, slot_table.shape[1])
    ieee = q.dtype == torch.float32
    scale = (1.0 / math.sqrt(dim)) * LOG2E
    if splits > 1:
        f32 = dict(dtype=torch.float32, device=q.device)
        pm = torch.empty((splits, rows, heads), **f32)
        pl = torch.zeros((splits, rows, heads), **f32)
        pacc = torch.empty((splits, rows, heads, dim), **f32)
    else:
        pm = pl = pacc = out
    _paged_attn_kernel[(n_blocks, heads, splits)](
        q, k_cache, v_cache, out, lse if lse is not None else out, pm, pl, pacc,
        block_req, block_row, row_start, kv_lens, slot_table,
        q.stride(0), q.stride(1), k_cache.stride(0), k_cache.stride(1),
        out.stride(0), out.stride(1), slot_table.stride(0), heads, rows, scale,
        HEAD_DIM=dim, BLOCK_M=block_m, BLOCK_N=BLOCK_N, SPLITS=splits, IEEE=ieee,
        WRITE_LSE=lse is not None, num_warps=4, num_stages=2,
    )
    if splits > 1:
        _combine_kernel[(rows, heads)](
            out, lse if lse is not None else out, pm, pl, pacc, heads, rows,
            out.stride(0), out.stride(1), HEAD_DIM=dim, SPLITS=splits,
            WRITE_LSE=lse is not None, num_warps=1)
    return out


def paged_attention_triton(q: torch.Tensor, batch, k_cache: torch.Tensor,
                           v_cache: torch.Tensor) -> torch.Tensor:
    """Drop-in for `paged_attention_torch(q, batch, k_cache, v_cache)` (a `RaggedBatch`)."""
    meta = batch.device_meta(q.device)
    bm = attention_block_m(meta["max_rows"])
    blocks = torch.from_numpy(np.stack(row_blocks(batch.row_offsets, bm)).astype(np.int32))
    if q.is_cuda:
        blocks = blocks.pin_memory()
    blocks = blocks.to(q.device, non_blocking=True)
    return paged_attention_blocks(q, blocks[0], blocks[1], meta["row_offsets"],
                                  meta["kv_lens"], meta["slot_table"], k_cache, v_cache, bm)
