"""A fused pass: layers [first, last) of a padded batch, with shapes fixed by its plan.

Everything the pass reads varies only through its buffers (`PassBuffers`: the plan's packed
indices, the input hidden states) and everything it returns lands in them (final hidden
states, one float64 vector of decisions), so the same Python code runs eagerly or is
captured once per geometry as a CUDA graph and replayed (`graphs.PassExecutor`).

Per layer (kernels of `vllm_elastic.kernels` on CUDA, `ops`' torch versions on CPU):
1. input norm of the rows, plus the tracked rows' previous inputs, and the layer-input
   write (one kernel); the tracked rows' old queries come from the same qkv GEMM when the
   batch is small (weights read once), else from a q-only GEMM;
2. RoPE + K/V page write (keeping the slots' previous K for the old attention); paged
   attention of all rows (+ log-sum-exp per row);
3. Elastic-Cache's probes: the tracked rows' old and new attention, compared per key
   (cosine over heads, summed over keys), and the window's attention mass per key;
4. output projection, MLP (fused residual norm and SwiGLU).
After the layers: similarity per request and layer, picks (most-attended committed token
per layer), the first layer whose similarity is below gamma (refresh start), and for the
candidates the argmax token and its float64 confidence (or their hidden states, when a
request samples with its own generator).
"""

from __future__ import annotations

import torch

from model_executor.layers import linear

from ..decoding import argmax_confidence
from . import ops
from .plan import PassGeometry, PassTensors, int_buffer_size

# Below this many rows + tracked rows the old queries share the qkv GEMM (the weights are
# read once; the GEMM is bound by that read), above it a q-only GEMM costs fewer FLOPs.
FUSE_OLD_QUERY_ROWS = 512


def drift_from_sums(acc: torch.Tensor) -> torch.Tensor:
    """acc [..., 3, rows, keys] head sums of old*now, old^2, now^2 -> per row, the sum
    over keys of the cosine over heads (the authors' code: dot / clamp(|old| |now|, 1e-8);
    zero where a key is absent)."""
    dot, oo, nn = acc.unbind(-3)
    return (dot / (oo.sqrt() * nn.sqrt()).clamp_min(1e-8)).sum(-1)


class PassBuffers:
    """The static buffers of one geometry: packed indices (host and device), input and
    output hidden states, the decision vector (device and host)."""

    def __init__(self, g: PassGeometry, d_model: int, dtype: torch.dtype,
                 device: torch.device):
        pin = device.type == "cuda"
        n = int_buffer_size(g)
        self.geometry = g
        self.host_ints = torch.zeros(n, dtype=torch.int32, pin_memory=pin)
        self.host = PassTensors(self.host_ints.numpy(), g)
        self.dev_ints = torch.zeros(n, dtype=torch.int32, device=device)
        self.dev = PassTensors(self.dev_ints, g)
        self.h_in = (None if g.from_embed
                     else torch.zeros((g.T, d_model), dtype=dtype, device=device))
        self.h_out = torch.zeros((g.T, d_model), dtype=dtype, device=device)
        self.layout = g.out_layout()
        total = self.layout["total"][0]
        self.out = torch.zeros(total, dtype=torch.float64, device=device)
        self.host_out = torch.zeros(total, dtype=torch.float64, pin_memory=pin)
        self.cand_h = (torch.zeros((g.C, d_model), dtype=dtype, device=device)
                       if g.C and not g.decode else None)
        self.runs = 0
        self._done: torch.cuda.Event | None = None

    def upload(self) -> None:
        if self._done is not None:  # the host buffer may still be in flight
            self._done.synchronize()
        self.dev_ints.copy_(self.host_ints, non_blocking=True)

    def download(self) -> None:
        self.host_out.copy_(self.out, non_blocking=True)
        if self.out.is_cuda:
            self._done = torch.cuda.Event()
            self._done.record()

    def results(self) -> dict:
        """Host views of the decisions (waits for the pass)."""
        if self._done is not None:
            self._done.synchronize()
        out = self.host_out.numpy()
        return {k: out[a:a + n] for k, (a, n) in self.layout.items() if k != "total"}


def run_layers(model, store, bufs: PassBuffers, kern: bool) -> None:
    """The pass of `bufs.geometry` on the data in `bufs` (graph-capturable when `kern`)."""
    g = bufs.geometry
    t = bufs.dev
    host = None if kern else bufs.host
    cfg = model.cfg
    eps = cfg.rms_norm_eps
    rope = model.rope
    h = model.embed(t.tokens.long()) if g.from_embed else bufs.h_in
    T, NT, nl = g.T, g.NT, g.num_layers
    dev = h.device
    tp = model.tp
    # Drift per layer: the kernels sum each tracked row's cosine over keys directly; the
    # torch version (and tensor parallelism, whose head sums are partial) keeps the head
    # sums for after an all-reduce.
    sums = NT and (not kern or tp.enabled)
    acc = torch.zeros((nl, 3, NT, g.M), dtype=torch.float32, device=dev) if sums else None
    row_cos = (torch.zeros((nl, NT), dtype=torch.float32, device=dev)
               if NT and not sums else None)
    mass = torch.zeros((nl, g.R, g.M), dtype=torch.float32, device=dev) if g.P else None
    no_acc = torch.zeros((3, 0, g.M), dtype=torch.float32, device=dev)
    fuse_old = kern and T + NT <= FUSE_OLD_QUERY_ROWS
    if kern:
        from vllm_elastic.kernels import layer_ops
    for i, li in enumerate(range(g.first, g.last)):
        layer = model.layers[li]
        H, D = layer.n_heads, layer.head_dim
        k_cache, v_cache = store.k[li], store.v[li]
        x_cache = store.x[li] if g.write_x else None
        x = ops.norm_rows(kern, h, layer.attn_norm, eps, x_cache, t, NT)
        q_old = old = k_prev = None
        if NT and fuse_old:
            qkv_all = linear(x, layer.w_qkv).view(T + NT, 3, H, D)
            qkv, q_old = qkv_all[:T], qkv_all[T:, :1]
        else:
            qkv = linear(x[:T], layer.w_qkv).view(T, 3, H, D)
            if NT:
                q_old = linear(x[T:], layer.w_qkv[:H * D]).view(NT, 1, H, D)
        if NT:
            q_old = ops.rope_q(kern, q_old, t.track_pos, rope)
            if kern:
                k_prev = torch.empty((T, H, D), dtype=k_cache.dtype, device=dev)
            else:
                old = ops.old_attention(q_old, g, t, host, k_cache)
        q = ops.rope_write(kern, qkv, t, rope, k_cache, v_cache, k_prev)
        attn, lse = ops.attention(kern, q, g, t, host, k_cache, v_cache,
                                  want_lse=kern and g.P > 0)
        if g.P:
            if kern:
                ops.drift_probe(q, lse, g, t, q_old, k_prev, k_cache, mass[i],
                                row_cos[i] if row_cos is not None else None,
                                acc[i] if acc is not None else None)
            else:
                ops.probe_now(q, g, t, host, k_cache, old,
                              acc[i] if acc is not None else no_acc, mass[i])
        h = layer_ops.finish(layer, h, attn) if kern else layer.finish(h, attn)
    bufs.h_out.copy_(h)
    out, lay = bufs.out, bufs.layout
    if g.P:
        R = g.R
        kv_len = t.kv_len
        if g.decide:
            if row_cos is not None:
                per_row = row_cos  # [layers, tracked rows]
            else:
                per_row = drift_from_sums(tp.all_reduce(acc))
            total = torch.zeros((nl, R + 1), dtype=torch.float32, device=dev)
            total.index_add_(1, t.t_req.long(), per_row)
            n_track = t.n_track
            denom = (n_track * kv_len).float().clamp_min(1.0)
            sim = torch.where(n_track > 0, total[:, :R] / denom, float("inf"))
            below = (sim < t.gamma.view(torch.float32)[None, :]) & (t.decides > 0)
            start = torch.where(below.any(0), below.float().argmax(0) + (g.first + 1),
                                torch.full((R,), cfg.n_layers, device=dev,
                                           dtype=torch.long))
            a, n = lay["start"]
            out[a:a + n].copy_(start)
        tp.all_reduce(mass)
        keys = torch.arange(g.M, device=dev)
        mass.masked_fill_(keys[None, None, :] >= kv_len[None, :, None], -1.0)
        mass.masked_fill_(t.is_mask.bool()[None], 0.0)
        picks = mass.topk(g.track_k, dim=2).indices  # [layers, R, k]
        a, n = lay["picks"]
        out[a:a + n].copy_(picks.transpose(0, 1).reshape(-1))
    if g.C:
        hc = h.index_select(0, t.cand_idx.long())
        if g.decode:
            x0, conf = argmax_confidence(model.logits(hc))
            stop = (x0[:, None] == t.stop_ids.long()[None, :]).any(1)
            conf = conf.masked_fill(stop & (t.cand_flag > 0), float("-inf"))
            a, n = lay["tokens"]
            out[a:a + n].copy_(x0)
            a, n = lay["conf"]
            out[a:a + n].copy_(conf)
        else:
            bufs.cand_h.copy_(hc)
