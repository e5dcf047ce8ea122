"""The operations of a fused pass, each as a Triton kernel (CUDA) or in plain torch.

A fused pass (`layers.run_layers`) runs the layers of a padded batch whose shapes are
fixed by its `PassPlan` geometry, so that a CUDA graph can replay it. Every operation here
takes the plan's device metadata (`PassTensors`); the torch versions also read its host
copy (`PassTensors` over numpy: they loop over requests, so they never run in a graph)
and compute exactly what the per-request reference path (`step_runner` with the
policies' own hooks) computes:

| op | kernel | torch (reference) |
|---|---|---|
| `norm_rows` | `norm_rows_triton` | `rms_norm` + `PagedKVStore.read_x` / `write_x` |
| `rope_write` | `rope_kv_write_triton` | `RotaryEmbedding.apply` + `PagedKVStore.write_kv` |
| `attention` | `paged_attention_blocks` (+ LSE) | `paged_attention_torch`'s SDPA per request |
| `drift_probe` | `probe_lse` (old keys) + `drift_probe` | `old_attention` (before the K write) + `probe_now`: `attention_probs` per request |

The kernels never store the old attention: the K/V write keeps each written slot's
previous K (`k_prev`), from which the probe rebuilds the old keys after the write.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch

from model_executor.layers import RotaryEmbedding, rms_norm

from ..attention import attend, attention_probs

if TYPE_CHECKING:
    from .plan import PassGeometry, PassTensors

LOG2E = 1.4426950408889634


def _k():
    from vllm_elastic import kernels

    return kernels


def _request_keys(t: "PassTensors", host: "PassTensors", r: int) -> torch.Tensor:
    """Slots of request r's keys (torch versions: one request at a time)."""
    return t.slot_table[r, :int(host.kv_len[r])].long()


def norm_rows(kern: bool, h: torch.Tensor, weight: torch.Tensor, eps: float,
              x_cache: torch.Tensor | None, t: "PassTensors", n_old: int) -> torch.Tensor:
    """[rows + n_old, d]: the rows' normed inputs, then the tracked rows' normed inputs of
    the previous step; the rows' inputs are written to the layer-input cache (x_slot >= 0)
    after the old ones were read."""
    if kern:
        return _k().norm_rows_triton(h, weight, eps, x_cache, t.x_slot, t.old_of_row, n_old)
    rows = h.shape[0]
    y = torch.empty((rows + n_old, h.shape[1]), dtype=h.dtype, device=h.device)
    y[:rows] = rms_norm(h, weight, eps)
    if x_cache is not None:
        xs = t.x_slot.long()
        valid = xs >= 0
        old = t.old_of_row.long()
        has_old = valid & (old >= 0)
        if n_old and bool(has_old.any()):
            y[rows + old[has_old]] = rms_norm(x_cache.index_select(0, xs[has_old]), weight, eps)
        x_cache.index_copy_(0, xs[valid], h[valid])
    return y


def rope_q(kern: bool, q_pre: torch.Tensor, pos: torch.Tensor, rope: RotaryEmbedding
           ) -> torch.Tensor:
    """Post-RoPE q of pre-RoPE q [rows, 1, heads, dim] at absolute positions."""
    if kern:
        return _k().rope_kv_write_triton(q_pre, pos, None, rope.cos, rope.sin, None, None)
    return rope.apply(q_pre[:, 0], pos.long())


def rope_write(kern: bool, qkv: torch.Tensor, t: "PassTensors", rope: RotaryEmbedding,
               k_cache: torch.Tensor, v_cache: torch.Tensor,
               k_prev: torch.Tensor | None = None) -> torch.Tensor:
    """Post-RoPE q [rows, heads, dim]; post-RoPE k and v written at the rows' slots
    (kernel: with each slot's previous K kept in `k_prev` [rows, heads, dim] if given)."""
    if kern:
        return _k().rope_kv_write_triton(qkv, t.pos, t.slot, rope.cos, rope.sin,
                                         k_cache, v_cache, k_prev)
    pos = t.pos.long()
    q, k, v = qkv.unbind(1)
    q, k = rope.apply(q, pos), rope.apply(k, pos)
    slots = t.slot.long()
    valid = slots >= 0
    k_cache.index_copy_(0, slots[valid], k[valid])
    v_cache.index_copy_(0, slots[valid], v[valid])
    return q


def attention(kern: bool, q: torch.Tensor, g: "PassGeometry", t: "PassTensors",
              host: "PassTensors | None", k_cache: torch.Tensor, v_cache: torch.Tensor,
              want_lse: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Each request's rows attend to its keys: out [rows, heads, dim] and, if asked, the
    rows' log-sum-exp (base 2, of scores * log2(e) / sqrt(dim)) [rows, heads] float32."""
    lse = (torch.empty((q.shape[0], q.shape[1]), dtype=torch.float32, device=q.device)
           if want_lse else None)
    if kern:
        out = _k().paged_attention_blocks(q, t.blk_req, t.blk_row, t.row_start, t.kv_len,
                                          t.slot_table, k_cache, v_cache, g.block_m, lse=lse)
        return out, lse
    out = torch.empty_like(q)
    scale = 1.0 / math.sqrt(q.shape[-1])
    for r in range(g.R):
        a, b = int(host.row_start[r]), int(host.row_start[r + 1])
        if a == b:
            continue
        slots = _request_keys(t, host, r)
        k = k_cache.index_select(0, slots).transpose(0, 1)
        v = v_cache.index_select(0, slots).transpose(0, 1)
        qr = q[a:b].transpose(0, 1)
        out[a:b] = attend(qr, k, v).transpose(0, 1)
        if lse is not None:
            s = torch.einsum("hnd,hkd->hnk", qr.float(), k.float()) * (scale * LOG2E)
            lse[a:b] = (torch.logsumexp(s * math.log(2.0), dim=-1) / math.log(2.0)).t()
    return out, lse


def old_attention(q_old: torch.Tensor, g: "PassGeometry", t: "PassTensors",
                  host: "PassTensors", k_cache: torch.Tensor) -> torch.Tensor:
    """Tracked rows' attention probabilities before this layer's K/V write (torch):
    [tracked rows, heads, max_len] float32."""
    old = torch.zeros((q_old.shape[0], q_old.shape[1], g.M), dtype=torch.float32,
                      device=q_old.device)
    for r in range(g.R):
        a, b = int(host.old_start[r]), int(host.old_start[r + 1])
        if a == b:
            continue
        k = k_cache.index_select(0, _request_keys(t, host, r))
        old[a:b, :, :k.shape[0]] = attention_probs(q_old[a:b], k).transpose(0, 1)
    return old


def drift_probe(q: torch.Tensor, lse: torch.Tensor, g: "PassGeometry", t: "PassTensors",
                q_old: torch.Tensor | None, k_prev: torch.Tensor | None,
                k_cache: torch.Tensor, mass: torch.Tensor, row_cos: torch.Tensor | None,
                acc: torch.Tensor | None) -> None:
    """Kernels: the tracked rows' old log-sum-exp (old keys through k_prev), then drift
    sums and window mass (into row_cos, or head sums into acc) and mass [R, max_len]."""
    k = _k()
    lse_old = None
    if q_old is not None:
        lse_old = k.probe_lse(q_old, t.old_start, t.kv_len, t.slot_table, k_cache,
                              g.probe_block_m, t.key_row, k_prev)
    k.drift_probe(q, lse, t.probe_idx, t.probe_start, t.n_track, t.win_off, q_old, lse_old,
                  t.old_start, t.kv_len, t.slot_table, k_cache,
                  t.key_row if q_old is not None else t.slot_table, k_prev, g.probe_block_m,
                  mass, row_cos=row_cos, acc=acc)


def probe_now(q: torch.Tensor, g: "PassGeometry", t: "PassTensors", host: "PassTensors",
              k_cache: torch.Tensor, old: torch.Tensor | None, acc: torch.Tensor,
              mass: torch.Tensor) -> None:
    """Torch: into zeroed acc [3, tracked rows, max_len] (head sums of old*now, old^2,
    now^2) and mass [R, max_len] (window attention mass per key, over heads and rows)."""
    for r in range(g.R):
        a, b = int(host.probe_start[r]), int(host.probe_start[r + 1])
        if a == b:
            continue
        k = k_cache.index_select(0, _request_keys(t, host, r))
        n = k.shape[0]
        rows = t.probe_idx[a:b].long()
        nt, w0 = int(host.n_track[r]), int(host.win_off[r])
        if nt:
            now = attention_probs(q.index_select(0, rows[:nt]), k)  # [heads, t, keys]
            o0 = int(host.old_start[r])
            po = old[o0:o0 + nt, :, :n].transpose(0, 1)
            acc[:, o0:o0 + nt, :n] = torch.stack(
                [(po * now).sum(0), (po * po).sum(0), (now * now).sum(0)])
        if b - a > w0:
            mass[r, :n] = attention_probs(q.index_select(0, rows[w0:]), k).sum(dim=(0, 1))
