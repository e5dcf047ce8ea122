"""Elastic-Cache's per-layer probes, batched over requests (Triton).

Per layer, Elastic-Cache needs the attention weights of a few rows of every request: the
tracked rows, before and after this step's K/V write (the drift test: cosine over heads
of their old and new attention, averaged over rows and keys), and the window rows (the
attention mass each key receives, to pick the next tracked token). The torch version
(`vllm_elastic.core.attention.attention_probs`, per request) materialises
[heads, rows, keys]; here the probabilities never leave the chip:

* `probe_lse`: per (request, head), the log-sum-exp of each probe row's scores over the
  request's keys (one flash-style pass). For the old attention of the tracked rows the
  keys are those before this step's write: a key whose position is a row of this step
  (`key_row` >= 0) is read from `k_prev`, the copy the RoPE/K-write kernel kept of it.
  The new attention's log-sum-exp comes from the paged-attention kernel.
* `drift_probe`: per (request, block of keys, group of heads), the old and new
  probabilities of the tracked rows and the new ones of the window rows, summed over the
  group's heads: old*new, old^2, new^2 per tracked row and key, and the window mass per
  key. Each group writes its partial sums (no atomics); `drift_reduce` adds the groups and
  turns the sums into each tracked row's sum over keys of the cosine (or, under tensor
  parallelism, hands the head sums over for an all-reduce first) and the mass per key.

Probe rows of request r are entries `probe_start[r]:probe_start[r+1]` (at most BLOCK_M of
them) of a list of rows of `q`: its `n_track[r]` tracked rows first, window rows from
entry `win_off[r]`; the tracked rows' old queries are rows `old_start[r]:` of `q_old`. Its
keys are `slot_table[r, :kv_lens[r]]`. Probabilities are float32 from float32 scores of the
rows' (bf16 or fp32) q and K, as in the reference.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

LOG2E = 1.4426950408889634
_BLOCK_N = 64


@triton.jit
def _lse_kernel(q_ptr, k_ptr, kp_ptr, krow_ptr, row_start_ptr, kv_len_ptr, slot_ptr, lse_ptr,
                sq_r, sq_h, sk_s, sk_h, s_slot, s_krow, n_heads, qk_scale,
                HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                HAS_PREV: tl.constexpr, IEEE: tl.constexpr):
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
            if HAS_PREV:
                kr = tl.load(krow_ptr + r.to(tl.int64) * s_krow + offs_n, mask=mask_n,
                             other=-1).to(tl.int64)
                prev = kr >= 0
                kp = tl.load(kp_ptr + kr[:, None] * sk_s + h * sk_h + offs_d[None, :],
                             mask=prev[:, None], other=0.0)
                k = tl.where(prev[:, None], kp, k)
            if IEEE:
                s = tl.dot(q, tl.trans(k), input_precision="ieee")
            else:
                s = tl.dot(q, tl.trans(k))
            s = tl.where(mask_n[None, :], s * qk_scale, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, 1))
            l_i = l_i * tl.exp2(m_i - m_new) + tl.sum(tl.exp2(s - m_new[:, None]), 1)
            m_i = m_new
        tl.store(lse_ptr + offs_m.to(tl.int64) * n_heads + h, m_i + tl.log2(l_i),
                 mask=mask_m)


@triton.jit
def _drift_kernel(q_ptr, qidx_ptr, lse_ptr, qo_ptr, lseo_ptr, k_ptr, kp_ptr, krow_ptr,
                  pstart_ptr, ostart_ptr, ntrack_ptr, winoff_ptr, kv_len_ptr, slot_ptr,
                  part_ptr, pmass_ptr,
                  sq_r, sq_h, sqo_r, sqo_h, sk_s, sk_h, s_slot, s_krow,
                  n_heads, max_len, n_old, n_req, qk_scale,
                  HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                  HEADS: tl.constexpr, IEEE: tl.constexpr):
    r = tl.program_id(0)
    kb = tl.program_id(1)
    g = tl.program_id(2)
    p0 = tl.load(pstart_ptr + r)
    p1 = tl.load(pstart_ptr + r + 1)
    kv_len = tl.load(kv_len_ptr + r)
    n0 = kb * BLOCK_N
    if (p1 > p0) & (n0 < kv_len):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        mask_n = offs_n < kv_len
        offs_m = tl.arange(0, BLOCK_M)
        mask_m = p0 + offs_m < p1
        rows = tl.load(qidx_ptr + p0 + offs_m, mask=mask_m, other=0).to(tl.int64)
        nt = tl.load(ntrack_ptr + r)
        woff = tl.load(winoff_ptr + r)
        o0 = tl.load(ostart_ptr + r)
        is_t = offs_m < nt
        is_w = (offs_m >= woff) & mask_m
        orow = (o0 + offs_m).to(tl.int64)
        offs_d = tl.arange(0, HEAD_DIM)
        slots = tl.load(slot_ptr + r.to(tl.int64) * s_slot + offs_n, mask=mask_n,
                        other=0).to(tl.int64)
        kr = tl.load(krow_ptr + r.to(tl.int64) * s_krow + offs_n, mask=mask_n,
                     other=-1).to(tl.int64)
        prev = kr >= 0
        valid = mask_m[:, None] & mask_n[None, :]
        t_valid = is_t[:, None] & mask_n[None, :]
        dot_acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        oo_acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        nn_acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        mass = tl.zeros([BLOCK_N], dtype=tl.float32)
        for h in range(g * HEADS, tl.minimum(g * HEADS + HEADS, n_heads)):
            k = tl.load(k_ptr + slots[:, None] * sk_s + h * sk_h + offs_d[None, :],
                        mask=mask_n[:, None], other=0.0)
            q = tl.load(q_ptr + rows[:, None] * sq_r + h * sq_h + offs_d[None, :],
                        mask=mask_m[:, None], other=0.0)
            if IEEE:
                s = tl.dot(q, tl.trans(k), input_precision="ieee")
            else:
                s = tl.dot(q, tl.trans(k))
            lse = tl.load(lse_ptr + rows * n_heads + h, mask=mask_m, other=0.0)
            p = tl.where(valid, tl.exp2(s * qk_scale - lse[:, None]), 0.0)
            mass += tl.sum(tl.where(is_w[:, None], p, 0.0), 0)
            if nt > 0:
                kp = tl.load(kp_ptr + kr[:, None] * sk_s + h * sk_h + offs_d[None, :],
                             mask=prev[:, None], other=0.0)
                k_old = tl.where(prev[:, None], kp, k)
                qo = tl.load(qo_ptr + orow[:, None] * sqo_r + h * sqo_h + offs_d[None, :],
                             mask=is_t[:, None], other=0.0)
                if IEEE:
                    so = tl.dot(qo, tl.trans(k_old), input_precision="ieee")
                else:
                    so = tl.dot(qo, tl.trans(k_old))
                lo = tl.load(lseo_ptr + orow * n_heads + h, mask=is_t, other=0.0)
                po = tl.where(t_valid, tl.exp2(so * qk_scale - lo[:, None]), 0.0)
                pn = tl.where(t_valid, p, 0.0)
                dot_acc += po * pn
                oo_acc += po * po
                nn_acc += pn * pn
        g64 = g.to(tl.int64)
        plane = n_old * max_len
        off = (g64 * 3 * plane) + orow[:, None] * max_len + offs_n[None, :]
        tl.store(part_ptr + off, dot_acc, mask=t_valid)
        tl.store(part_ptr + off + plane, oo_acc, mask=t_valid)
        tl.store(part_ptr + off + 2 * plane, nn_acc, mask=t_valid)
        tl.store(pmass_ptr + (g64 * n_req + r) * max_len + offs_n, mass, mask=mask_n)


@triton.jit
def _drift_reduce_kernel(part_ptr, pmass_ptr, pstart_ptr, ostart_ptr, ntrack_ptr, kv_len_ptr,
                         rowcos_ptr, acc_ptr, mass_ptr, n_groups, max_len, n_old, n_req,
                         BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, FINAL: tl.constexpr):
    r = tl.program_id(0)
    kb = tl.program_id(1)
    kv_len = tl.load(kv_len_ptr + r)
    n0 = kb * BLOCK_N
    probed = tl.load(pstart_ptr + r + 1) > tl.load(pstart_ptr + r)
    if probed & (n0 < kv_len):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        mask_n = offs_n < kv_len
        m = tl.zeros([BLOCK_N], dtype=tl.float32)
        for g in range(0, n_groups):
            m += tl.load(pmass_ptr + (g * n_req + r) * max_len + offs_n, mask=mask_n,
                         other=0.0)
        tl.store(mass_ptr + r * max_len + offs_n, m, mask=mask_n)
        nt = tl.load(ntrack_ptr + r)
        if nt > 0:
            o0 = tl.load(ostart_ptr + r)
            offs_m = tl.arange(0, BLOCK_M)
            is_t = offs_m < nt
            orow = (o0 + offs_m).to(tl.int64)
            t_valid = is_t[:, None] & mask_n[None, :]
            plane = n_old * max_len
            off = orow[:, None] * max_len + offs_n[None, :]
            d = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
            o = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
            n = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
            for g in range(0, n_groups):
                base = part_ptr + g * 3 * plane + off
                d += tl.load(base, mask=t_valid, other=0.0)
                o += tl.load(base + plane, mask=t_valid, other=0.0)
                n += tl.load(base + 2 * plane, mask=t_valid, other=0.0)
            if FINAL:  # the authors' cosine over heads: dot / clamp(|old| |new|, 1e-8)
                c = d / tl.maximum(tl.sqrt(o) * tl.sqrt(n), 1e-8)
                c = tl.where(t_valid, c, 0.0)
                tl.atomic_add(rowcos_ptr + orow, tl.sum(c, 1), mask=is_t)
            else:
                tl.store(acc_ptr + off, d, mask=t_valid)
                tl.store(acc_ptr + plane + off, o, mask=t_valid)
                tl.store(acc_ptr + 2 * plane + off, n, mask=t_valid)


def _scale(dim: int) -> float:
    return (1.0 / math.sqrt(dim)) * LOG2E


def probe_lse(q: torch.Tensor, row_start: torch.Tensor, kv_lens: torch.Tensor,
              slot_table: torch.Tensor, k_cache: torch.Tensor, block_m: int,
              key_row: torch.Tensor | None = None, k_prev: torch.Tensor | None = None
              ) -> torch.Tensor:
    """Rows of request r are q[row_start[r]:row_start[r+1]]: their log-sum-exp (base 2, of
    q.k * log2(e) / sqrt(dim)) over the request's keys, per head: [rows, heads] float32.
    With key_row [R, max_len] / k_prev: key j of request r is k_prev[key_row[r, j]] where
    that is >= 0 (the key before this step's write)."""
    n, heads, dim = q.shape
    lse = torch.empty((n, heads), dtype=torch.float32, device=q.device)
    R = kv_lens.shape[0]
    if n:
        has_prev = key_row is not None
        _lse_kernel[(R, heads)](
            q, k_cache, k_prev if has_prev else k_cache, key_row if has_prev else slot_table,
            row_start, kv_lens, slot_table, lse,
            q.stride(0), q.stride(1), k_cache.stride(0), k_cache.stride(1),
            slot_table.stride(0), key_row.stride(0) if has_prev else 0, heads, _scale(dim),
            HEAD_DIM=dim, BLOCK_M=block_m, BLOCK_N=_BLOCK_N, HAS_PREV=has_prev,
            IEEE=q.dtype == torch.float32, num_warps=4)
    return lse


def probe_groups(n_req: int, max_len: int, heads: int) -> int:
    """Head groups of `drift_probe`: more programs at small batches, at most 8 groups
    (the reduce adds the groups' partial sums one after the other)."""
    blocks = n_req * triton.cdiv(max_len, _BLOCK_N)
    g = 1
    while g < min(heads, 8) and blocks * g < 128 and heads % (2 * g) == 0:
        g *= 2
    return g


def drift_probe(q: torch.Tensor, lse: torch.Tensor, probe_idx: torch.Tensor,
                probe_start: torch.Tensor, n_track: torch.Tensor, win_off: torch.Tensor,
                q_old: torch.Tensor | None, lse_old: torch.Tensor | None,
                old_start: torch.Tensor, kv_lens: torch.Tensor, slot_table: torch.Tensor,
                k_cache: torch.Tensor, key_row: torch.Tensor, k_prev: torch.Tensor | None,
                block_m: int, mass: torch.Tensor, row_cos: torch.Tensor | None = None,
                acc: torch.Tensor | None = None) -> None:
    """One layer's drift sums and window mass for every request.

    `lse` [q rows, heads]: the rows' log-sum-exp over the new keys; `q_old` / `lse_old`
    [tracked rows, heads, ...]: old queries and their log-sum-exp over the old keys.
    Writes mass [R, max_len] (window attention mass per key, over heads and window rows)
    and either adds to row_cos [tracked rows] each row's sum over keys of the cosine over
    heads of its old and new attention, or (tensor parallel: head sums are partial)
    writes acc [3, tracked rows, max_len] = sum over heads of old*new, old^2, new^2."""
    if q.stride(2) != 1:
        q = q.contiguous()
    n, heads, dim = q.shape
    R = kv_lens.shape[0]
    max_len = slot_table.shape[1]
    n_old = 0 if q_old is None else q_old.shape[0]
    groups = probe_groups(R, max_len, heads)
    kb = triton.cdiv(max_len, _BLOCK_N)
    f32 = dict(dtype=torch.float32, device=q.device)
    part = torch.empty((groups, 3, n_old, max_len), **f32)
    pmass = torch.empty((groups, R, max_len), **f32)
    if q_old is None:
        q_old, lse_old, k_prev = q, lse, k_cache  # unused: every n_track is 0
    _drift_kernel[(R, kb, groups)](
        q, probe_idx, lse, q_old, lse_old, k_cache, k_prev, key_row, probe_start, old_start,
        n_track, win_off, kv_lens, slot_table, part, pmass,
        q.stride(0), q.stride(1), q_old.stride(0), q_old.stride(1),
        k_cache.stride(0), k_cache.stride(1), slot_table.stride(0), key_row.stride(0),
        heads, max_len, n_old, R, _scale(dim),
        HEAD_DIM=dim, BLOCK_M=block_m, BLOCK_N=_BLOCK_N, HEADS=heads // groups,
        IEEE=q.dtype == torch.float32, num_warps=4)
    final = acc is None
    _drift_reduce_kernel[(R, kb)](
        part, pmass, probe_start, old_start, n_track, kv_lens,
        row_cos if row_cos is not None else mass,  # no tracked rows: never written
        acc if acc is not None else mass, mass, groups, max_len, n_old, R,
        BLOCK_M=block_m, BLOCK_N=_BLOCK_N, FINAL=final, num_warps=4)
