"""Elastic-Cache's per-layer probes, batched over requests (Triton).

Per layer, Elastic-Cache needs the attention weights of a few rows of every request: the
tracked rows (before and after this step's K/V write, for the drift test) and the window
rows (the attention mass each key receives, to pick the next tracked token). The torch
path (`vllm_elastic.core.attention.attention_probs`, looped per request) materialises
[heads, rows, keys] per request; here one launch covers every request and reduces on the
fly:

* `probe_stats`: per (request, head), the softmax max and normaliser of each probe row
  over the request's keys (one pass over its K, flash-style).
* `probe_old`: per-head probabilities of the tracked rows [rows, heads, max_len] (small:
  tracked rows only), kept until the same layer's `probe_now`.
* `probe_now`: per (request, block of keys, group of heads), accumulates
  - for tracked rows: sum_h old*now, old^2, now^2 (for the cosine over heads, the
    "heads" drift of the authors' code: `drift_from_sums`);
  - for window rows: the probability mass each key receives, summed over heads and rows.
  Head groups run in parallel (a batch-1 layer has only a few key blocks) and add their
  shares with float32 atomics, so sums are exact up to float32 reordering.

Rows of request r are `q[row_start[r]:row_start[r+1]]` (at most BLOCK_M of them); its
keys are `slot_table[r, :kv_lens[r]]`. Probabilities are float32 from float32 scores of
the rows' (bf16 or fp32) q and K, as in the reference.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl


@triton.jit
def _stats_kernel(q_ptr, k_ptr, row_start_ptr, kv_len_ptr, slot_ptr, m_ptr, l_ptr,
                  sq_r, sq_h, sk_s, sk_h, s_slot, n_heads, qk_scale,
                  HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                  IEEE: tl.constexpr):
    r = tl.program_id(0)
    h = tl.program_id(1)
    row0 = tl.load(row_start_ptr + r)
    row1 = tl.load(row_start_ptr + r + 1)
    if row1 > row0:
        offs_m = row0 + tl.arange(0, BLOCK_M)
        mask_m = offs_m < row1
        offs_d = tl.arange(0, HEAD_DIM)
        q = tl.load(q_ptr + offs_m[:, None].to(tl.int64) * sq_r + h * sq_h + offs_d[None, :],
                    mask=mask_m[:, None], other=0.0)
        kv_len = tl.load(kv_len_ptr + r)
        m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
        l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
        slot_row = slot_ptr + r.to(tl.int64) * s_slot
        for n0 in range(0, kv_len, BLOCK_N):
            offs_n = n0 + tl.arange(0, BLOCK_N)
            mask_n = offs_n < kv_len
            slots = tl.load(slot_row + offs_n, mask=mask_n, other=0).to(tl.int64)
            k = tl.load(k_ptr + slots[:, None] * sk_s + h * sk_h + offs_d[None, :],
                        mask=mask_n[:, None], other=0.0)
            if IEEE:
                s = tl.dot(q, tl.trans(k), input_precision="ieee")
            else:
                s = tl.dot(q, tl.trans(k))
            s = tl.where(mask_n[None, :], s * qk_scale, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, 1))
            l_i = l_i * tl.exp2(m_i - m_new) + tl.sum(tl.exp2(s - m_new[:, None]), 1)
            m_i = m_new
        tl.store(m_ptr + offs_m * n_heads + h, m_i, mask=mask_m)
        tl.store(l_ptr + offs_m * n_heads + h, l_i, mask=mask_m)


@triton.jit
def _probs_kernel(q_ptr, k_ptr, row_start_ptr, kv_len_ptr, slot_ptr, m_ptr, l_ptr,
                  old_ptr, old_start_ptr, n_track_ptr, win_off_ptr, acc_ptr, mass_ptr,
                  sq_r, sq_h, sk_s, sk_h, s_slot, n_heads, max_len, n_old, qk_scale,
                  HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                  HEADS_PER_PROG: tl.constexpr, MODE_NOW: tl.constexpr, IEEE: tl.constexpr):
    """One program: a request, a block of its keys, a group of heads. OLD mode stores the
    per-head probabilities; NOW mode adds its heads' share of the three head sums (tracked
    rows) and of the window mass into zeroed buffers (atomics across head groups)."""
    r = tl.program_id(0)
    kb = tl.program_id(1)
    h0 = tl.program_id(2) * HEADS_PER_PROG
    row0 = tl.load(row_start_ptr + r)
    row1 = tl.load(row_start_ptr + r + 1)
    kv_len = tl.load(kv_len_ptr + r)
    n0 = kb * BLOCK_N
    if (row1 > row0) & (n0 < kv_len):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        mask_n = offs_n < kv_len
        offs_m = tl.arange(0, BLOCK_M)
        rows = row0 + offs_m
        mask_m = rows < row1
        offs_d = tl.arange(0, HEAD_DIM)
        slots = tl.load(slot_ptr + r.to(tl.int64) * s_slot + offs_n, mask=mask_n,
                        other=0).to(tl.int64)
        valid = mask_m[:, None] & mask_n[None, :]
        if MODE_NOW:
            n_track = tl.load(n_track_ptr + r)
            win_off = tl.load(win_off_ptr + r)
            old0 = tl.load(old_start_ptr + r)
            is_track = offs_m < n_track
            is_win = (offs_m >= win_off) & mask_m
            t_valid = is_track[:, None] & mask_n[None, :]
            dot_acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
            oo_acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
            nn_acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
            mass = tl.zeros([BLOCK_N], dtype=tl.float32)
        else:
            old0 = row0
        old_rows = (old0 + offs_m)[:, None].to(tl.int64)
        for h in range(h0, tl.minimum(h0 + HEADS_PER_PROG, n_heads)):
            q = tl.load(q_ptr + rows[:, None].to(tl.int64) * sq_r + h * sq_h + offs_d[None, :],
                        mask=mask_m[:, None], other=0.0)
            k = tl.load(k_ptr + slots[:, None] * sk_s + h * sk_h + offs_d[None, :],
                        mask=mask_n[:, None], other=0.0)
            if IEEE:
                s = tl.dot(q, tl.trans(k), input_precision="ieee")
            else:
                s = tl.dot(q, tl.trans(k))
            m = tl.load(m_ptr + rows * n_heads + h, mask=mask_m, other=0.0)
            l = tl.load(l_ptr + rows * n_heads + h, mask=mask_m, other=1.0)
            p = tl.exp2(s * qk_scale - m[:, None]) / l[:, None]
            p = tl.where(valid, p, 0.0)
            old_off = (old_rows * n_heads + h) * max_len + offs_n[None, :]
            if MODE_NOW:
                po = tl.load(old_ptr + old_off, mask=t_valid, other=0.0)
                dot_acc += po * p
                oo_acc += po * po
                nn_acc += p * p
                mass += tl.sum(tl.where(is_win[:, None], p, 0.0), 0)
            else:
                tl.store(old_ptr + old_off, p, mask=valid)
        if MODE_NOW:
            acc_off = old_rows * max_len + offs_n[None, :]
            plane = n_old * max_len
            tl.atomic_add(acc_ptr + acc_off, dot_acc, mask=t_valid)
            tl.atomic_add(acc_ptr + plane + acc_off, oo_acc, mask=t_valid)
            tl.atomic_add(acc_ptr + 2 * plane + acc_off, nn_acc, mask=t_valid)
            tl.atomic_add(mass_ptr + r.to(tl.int64) * max_len + offs_n, mass, mask=mask_n)


_BLOCK_N = 64


def _block_m(max_rows: int) -> int:
    return 32 if max_rows <= 32 else 64  # two compiled variants


def probe_max_rows() -> int:
    """Most probe rows per request the kernels take (the caller falls back above it)."""
    return 64


def _stats(q, row_start, kv_lens, slot_table, k_cache, max_rows):
    n, heads, dim = q.shape
    m = torch.empty((n, heads), dtype=torch.float32, device=q.device)
    l = torch.empty((n, heads), dtype=torch.float32, device=q.device)
    R = kv_lens.shape[0]
    _stats_kernel[(R, heads)](
        q, k_cache, row_start, kv_lens, slot_table, m, l,
        q.stride(0), q.stride(1), k_cache.stride(0), k_cache.stride(1), slot_table.stride(0),
        heads, (1.0 / math.sqrt(dim)) * 1.4426950408889634,
        HEAD_DIM=dim, BLOCK_M=_block_m(max_rows), BLOCK_N=_BLOCK_N,
        IEEE=q.dtype == torch.float32, num_warps=4)
    return m, l


_HEADS_PER_PROG = 4


def _launch_probs(q, row_start, kv_lens, slot_table, k_cache, max_rows, m, l, old,
                  old_start, n_track, win_off, acc, mass, n_old, mode_now):
    n, heads, dim = q.shape
    R = kv_lens.shape[0]
    max_len = slot_table.shape[1]
    grid = (R, triton.cdiv(max_len, _BLOCK_N), triton.cdiv(heads, _HEADS_PER_PROG))
    _probs_kernel[grid](
        q, k_cache, row_start, kv_lens, slot_table, m, l,
        old, old_start, n_track, win_off, acc, mass,
        q.stride(0), q.stride(1), k_cache.stride(0), k_cache.stride(1), slot_table.stride(0),
        heads, max_len, n_old, (1.0 / math.sqrt(dim)) * 1.4426950408889634,
        HEAD_DIM=dim, BLOCK_M=_block_m(max_rows), BLOCK_N=_BLOCK_N,
        HEADS_PER_PROG=_HEADS_PER_PROG, MODE_NOW=mode_now,
        IEEE=q.dtype == torch.float32, num_warps=4)


def probe_old(q: torch.Tensor, row_start: torch.Tensor, kv_lens: torch.Tensor,
              slot_table: torch.Tensor, k_cache: torch.Tensor, max_rows: int) -> torch.Tensor:
    """Per-head attention probabilities of each request's rows: [rows, heads, max_len]
    float32 (undefined past a request's keys)."""
    if q.stride(2) != 1:
        q = q.contiguous()
    n, heads, dim = q.shape
    max_len = slot_table.shape[1]
    out = torch.empty((n, heads, max_len), dtype=torch.float32, device=q.device)
    if n == 0:
        return out
    m, l = _stats(q, row_start, kv_lens, slot_table, k_cache, max_rows)
    _launch_probs(q, row_start, kv_lens, slot_table, k_cache, max_rows, m, l, out,
                  row_start, kv_lens, kv_lens, out, out, 0, False)
    return out


def probe_now(q: torch.Tensor, row_start: torch.Tensor, kv_lens: torch.Tensor,
              slot_table: torch.Tensor, k_cache: torch.Tensor, max_rows: int,
              n_track: torch.Tensor, win_off: torch.Tensor, old: torch.Tensor | None,
              old_start: torch.Tensor | None, acc: torch.Tensor, mass: torch.Tensor) -> None:
    """Rows of request r: its n_track[r] tracked rows first, window rows from win_off[r];
    the tracked rows' old probabilities are `old[old_start[r] + j]` (from `probe_old`).
    Adds into zeroed buffers: acc [3, n_old, max_len] = sum over heads of old*now, old^2,
    now^2 per tracked row and key; mass [R, max_len] = attention mass from the window
    rows, summed over heads and rows. `drift_from_sums` turns acc into the similarity."""
    if q.stride(2) != 1:
        q = q.contiguous()
    if q.shape[0] == 0:
        return
    m, l = _stats(q, row_start, kv_lens, slot_table, k_cache, max_rows)
    n_old = acc.shape[1]
    if old is None:
        old, old_start = m, row_start  # unused: every n_track is 0
    _launch_probs(q, row_start, kv_lens, slot_table, k_cache, max_rows, m, l, old,
                  old_start, n_track, win_off, acc, mass, n_old, True)


def drift_from_sums(acc: torch.Tensor) -> torch.Tensor:
    """acc [..., 3, rows, keys] head sums -> per row, the sum over keys of the cosine
    over heads (authors' code: dot / clamp(|old| |now|, 1e-8); zero where no key)."""
    dot, oo, nn = acc.unbind(-3)
    return (dot / (oo.sqrt() * nn.sqrt()).clamp_min(1e-8)).sum(-1)
