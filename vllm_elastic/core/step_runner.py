"""Advances a batch of requests by one denoising step.

The requests of one step may be at any stage (first full pass, different blocks, different
policies, parameters and lengths): their rows are concatenated into one ragged batch, so
each projection is one GEMM for the whole batch and attention is one call; no request is
padded to another's length.

A step runs in two phases:
1. The row pass: every request's policy rows go through all layers.
2. The refresh pass: requests whose policy asked for a refresh (Elastic-Cache's drift test
   failed at layer l*) recompute every row from layer l*+1 on, starting from that layer's
   cached inputs; each joins the pass at its own layer. Deciding after phase 1 costs one
   host sync per step instead of one per layer; the rows phase 1 computed above l* are
   overwritten by the refresh, so the tokens are those of a layer-by-layer decision.
Then the candidates' logits decide the commits (one more host transfer).

On CUDA (Triton present, `attention.use_kernels(True)`, the default) each layer runs the
fused kernels of `vllm_elastic.kernels` (RMSNorm, RoPE + K/V page write, paged attention,
residual + norm, SwiGLU) and the Elastic-Cache hooks of all requests run batched
(`policies.elastic.ElasticBatch`: a fixed number of launches per layer whatever the batch;
its refresh decisions cost one host transfer for the whole batch). The CPU path is the
plain torch one; both compute the same tokens (checked in float32).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from model_executor.llada import LLaDAModel

from .attention import RaggedBatch, paged_attention
from .decoding import choose_tokens, select_commits
from .kv_store import PagedKVStore
from .policies.base import LayerView
from .request import Request, StepOutput

try:  # Triton kernels (CUDA); absent or unused on CPU
    from vllm_elastic import kernels as _kernels
    from vllm_elastic.kernels import layer_ops as _layer_ops
except ImportError:  # pragma: no cover - Triton missing
    _kernels = None
    _layer_ops = None


def _kernels_enabled(t: torch.Tensor) -> bool:
    return _kernels is not None and _kernels.AVAILABLE and _kernels.enabled(t)


@dataclass
class _Segment:
    """One request's rows in a pass."""

    request: Request
    positions: list[int]  # host copy (row order)
    pos: torch.Tensor  # device positions
    slots: torch.Tensor  # device slots of the rows
    start_layer: int
    full: bool  # rows are every position, in order
    h: torch.Tensor | None = None
    cached_input: bool = False  # h was read from the layer-input cache at start_layer


class StepRunner:
    def __init__(self, model: LLaDAModel, store: PagedKVStore):
        self.model = model
        self.store = store
        self.num_layers = model.cfg.n_layers

    @torch.inference_mode()
    def step(self, requests: list[Request]) -> list[StepOutput]:
        if not requests:
            return []
        device = self.model.device
        segments = []
        for r in requests:
            if r.finished:
                raise ValueError(f"request {r.id!r} is already finished")
            if r.slot_map is None:
                raise ValueError(f"request {r.id!r} has no KV pages")
            r.begin_step()
            rows = r.policy.rows(full=r.needs_full_pass)
            r.needs_full_pass = False
            full = rows is None
            positions = list(range(r.total_len)) if full else rows
            pos = torch.tensor(positions, dtype=torch.long, device=device)
            seg = _Segment(r, positions, pos, r.slot_map.index_select(0, pos), 0, full)
            seg.h = self.model.embed(r.canvas.index_select(0, pos))
            segments.append(seg)

        self._fast = _kernels_enabled(segments[0].h)
        self._elastic = self._elastic_batch(segments) if self._fast else None
        final = self._run(segments, 0)

        # Refresh pass for requests whose policy asks for one.
        if self._elastic is not None:
            self._elastic.refresh_layers()  # one host transfer for every request
        refresh = []
        for seg in segments:
            r = seg.request
            start = r.policy.refresh_layer(self.num_layers) if not seg.full else None
            if start is not None:
                pos = torch.arange(r.total_len, device=device)
                refresh.append(_Segment(r, list(range(r.total_len)), pos, r.slot_map, start,
                                        True))
        if refresh:
            final.update(self._run(refresh, min(s.start_layer for s in refresh)))

        # Candidates' logits -> commits.
        all_segs = {s.request.id: s for s in segments}
        for s in refresh:
            all_segs[s.request.id] = s
        cand_lists, rows = [], []
        for r in requests:
            seg = all_segs[r.id]
            cands = r.candidates()
            cand_lists.append(cands)
            if seg.full:
                idx = cands
            else:
                where = {p: i for i, p in enumerate(seg.positions)}
                idx = [where[p] for p in cands]
            rows.append(final[r.id].index_select(
                0, torch.tensor(idx, dtype=torch.long, device=device)))
        logits = self.model.logits(torch.cat(rows))
        if self._elastic is not None:
            self._elastic.finish_step()  # picks to the host with the sync below
        tokens, conf = choose_tokens(logits, requests, [len(c) for c in cand_lists])

        outputs = []
        refreshed = {s.request.id: s.start_layer for s in refresh}
        for r, seg, cands, tk, cf in zip(requests, segments, cand_lists, tokens, conf):
            self._account(r, seg, refreshed.get(r.id))
            pos, tok = select_commits(r, cands, tk, cf)
            outputs.append(r.commit(pos, tok))
            r.policy.end_step()
        return outputs

    # -- the layer loop ----------------------------------------------------------------------

    def _run(self, segments: list[_Segment], first_layer: int) -> dict[str, torch.Tensor]:
        model, store = self.model, self.store
        active: list[_Segment] = []
        pending = sorted(segments, key=lambda s: s.start_layer)
        h = None
        batch: RaggedBatch | None = None
        for li in range(first_layer, self.num_layers):
            layer = model.layers[li]
            joining = []
            while pending and pending[0].start_layer == li:
                joining.append(pending.pop(0))
            joined = bool(joining)
            if joined and h is not None:
                self._split(active, h)  # hand the running rows back before re-batching
            for seg in joining:
                if seg.h is None:  # a refresh starts from the layer's cached inputs
                    seg.h = store.read_x(li, seg.slots)
                    seg.cached_input = True
                active.append(seg)
            if not active:
                continue
            if joined or h is None:
                h = torch.cat([s.h for s in active]) if len(active) > 1 else active[0].h
                offsets = [0]
                for s in active:
                    offsets.append(offsets[-1] + len(s.positions))
                batch = RaggedBatch(offsets, [s.request.slot_map for s in active])
                pos = torch.cat([s.pos for s in active])
                slots = torch.cat([s.slots for s in active])
                eb = self._elastic
                if eb is not None:  # batched Elastic hooks replace the per-request ones
                    eb.begin_pass([(s.request.policy if eb.eligible(s.request.policy)
                                    else None, s.full, s.pos, s.slots) for s in active],
                                  offsets, batch.device_meta(h.device), li)
                hooked = [(i, s) for i, s in enumerate(active)
                          if s.request.policy.has_layer_hooks
                          and not (eb is not None and eb.eligible(s.request.policy))]
                # Layer inputs are written for the rows of policies that keep them: one
                # write for the whole batch. (A refresh segment re-writes, at its start
                # layer, the very inputs it just read: a no-op.)
                keep = [s.request.policy.keeps_layer_inputs for s in active]
                if all(keep):
                    x_rows, x_slots = None, slots
                elif any(keep):
                    x_rows = torch.cat([torch.arange(offsets[i], offsets[i + 1],
                                                     device=h.device)
                                        for i in range(len(active)) if keep[i]])
                    x_slots = slots.index_select(0, x_rows)
                else:
                    x_rows, x_slots = None, None
                fused = self._fast and not hooked
            if fused:
                # Fused path: norm + GEMM, batched Elastic probe of the old K, then RoPE
                # and the K/V page write in one launch.
                qkv = _layer_ops.qkv_projection(layer, h)
                if eb is not None:
                    eb.before_kv_write(li, layer, store, model.rope)
                q = _kernels.rope_kv_write_triton(qkv, pos, slots, model.rope.cos,
                                                  model.rope.sin, store.k[li], store.v[li])
                views = []
            else:
                q, k, v = layer.qkv(h, pos, model.rope)
                if eb is not None:
                    eb.before_kv_write(li, layer, store, model.rope)
                views = []
                for i, s in hooked:
                    a, b = batch.row_offsets[i], batch.row_offsets[i + 1]
                    view = LayerView(li, layer, store, s.pos, q[a:b], h[a:b], s.full,
                                     model.rope)
                    s.request.policy.before_kv_write(view)
                    views.append((i, s, view))
                store.write_kv(li, slots, k, v)
            if x_slots is not None:
                store.write_x(li, x_slots, h if x_rows is None else h.index_select(0, x_rows))
            subsets = {i: view.subset for i, s, view in views
                       if s.request.policy.selects_queries}
            for i, s, view in views:
                if i in subsets:
                    subsets[i] = s.request.policy.query_subset(view)
            if not any(v is not None for v in subsets.values()):
                attn = paged_attention(q, batch, store.k[li], store.v[li])
                if eb is not None:
                    eb.after_attention(li, q, store)
                for _, s, view in views:
                    s.request.policy.after_attention(view)
                h = _layer_ops.finish(layer, h, attn) if self._fast else layer.finish(h, attn)
            else:
                if eb is not None:  # needs only q and this layer's K, not the outputs
                    eb.after_attention(li, q, store)
                h = self._finish_subsets(layer, li, active, batch, h, q, subsets, views)
        if h is not None:
            self._split(active, h)
        if self._elastic is not None:
            self._elastic.end_pass()
        return {s.request.id: s.h for s in active}

    def _finish_subsets(self, layer, li: int, active: list[_Segment], batch: RaggedBatch,
                        h: torch.Tensor, q: torch.Tensor, subsets: dict, views: list
                        ) -> torch.Tensor:
        """Attention and MLP for each segment's query subset only (SPA-Cache's layers)."""
        device = h.device
        idx, offsets = [], [0]
        for i, s in enumerate(active):
            a, b = batch.row_offsets[i], batch.row_offsets[i + 1]
            sub = subsets.get(i)
            rows = torch.arange(a, b, device=device) if sub is None else sub + a
            idx.append(rows)
            offsets.append(offsets[-1] + int(rows.shape[0]))
        gather = torch.cat(idx)
        sub_batch = RaggedBatch(offsets, batch.slot_maps)
        attn = paged_attention(q.index_select(0, gather), sub_batch,
                               self.store.k[li], self.store.v[li])
        for _, s, view in views:
            s.request.policy.after_attention(view)
        out = layer.finish(h.index_select(0, gather), attn)
        view_of = {i: view for i, _, view in views}
        pieces = []
        for i, s in enumerate(active):
            seg_out = out[offsets[i]:offsets[i + 1]]
            if subsets.get(i) is None:
                pieces.append(seg_out)
            else:
                pieces.append(s.request.policy.merge_subset(view_of[i], subsets[i], seg_out))
        return torch.cat(pieces)

    def _elastic_batch(self, segments: list[_Segment]):
        """The batched Elastic hooks for this step, or None (per-request hooks)."""
        from .policies.elastic import ElasticBatch

        pols = [s.request.policy for s in segments
                if ElasticBatch.eligible(s.request.policy)]
        if not pols:
            return None
        limit = _kernels.probe_max_rows()
        for p in pols:
            if max(p._n_track + p._n_window, len(p._window_pos)) > limit:
                return None
        return ElasticBatch(pols, self.num_layers, self.model.device)

    @staticmethod
    def _split(active: list[_Segment], h: torch.Tensor) -> None:
        o = 0
        for s in active:
            n = len(s.positions)
            s.h = h[o:o + n]
            o += n

    def _account(self, r: Request, seg: _Segment, refresh_start: int | None) -> None:
        L = self.num_layers
        st = r.stats
        st.rows_full += r.total_len * L
        st.layers_total += L
        if seg.full:
            st.full_steps += 1
            st.rows_computed += r.total_len * L
            st.layers_refreshed += L
        elif refresh_start is not None:
            st.drift_events += 1
            n = len(seg.positions)
            st.rows_computed += n * refresh_start + r.total_len * (L - refresh_start)
            st.layers_refreshed += L - refresh_start
            st.speculative_rows += n * (L - refresh_start)
        else:
            st.rows_computed += r.policy.rows_computed(len(seg.positions), L)

