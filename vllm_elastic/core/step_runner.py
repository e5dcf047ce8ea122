"""Advances a batch of requests by one denoising step.

The requests of one step may be at any stage (first full pass, different blocks, different
policies, parameters and lengths): their rows are concatenated into one ragged batch, so
each projection is one GEMM for the whole batch and attention is one call; no request is
padded to another's length.

A step runs in two phases:
1. The row pass: every request's policy rows go through the layers.
2. The refresh pass: requests whose policy asked for a refresh (Elastic-Cache's drift test
   failed at layer l*) recompute every row from layer l*+1 on, starting from that layer's
   cached inputs; each joins the pass at its own layer. Deciding after phase 1 costs one
   host transfer per step instead of one per layer; rows phase 1 computed above l* are
   overwritten by the refresh, so the tokens are those of a layer-by-layer decision.
Then the candidates' logits decide the commits.

Two paths compute the same tokens (checked in float32):
* the fused path (`core.fused`; the default on CUDA with Triton): each pass
  is one padded batch of fixed geometry whose per-layer work is a handful of kernels, with
  the Elastic-Cache probes of every request batched, replayed as a CUDA graph once its
  geometry repeats; the row pass stops where the batch is expected to
  refresh, and decisions reach the host in one copy per pass. It takes the policies
  `none`, `prefix`, `dual`, `dkv` and `elastic` (drift "heads", at most 64 tracked + window
  rows);
* the reference path: plain torch with each policy's own per-layer hooks (every policy;
  the CPU default; SPA-Cache and the "rows" drift everywhere).
Requests of one step are split between them by policy.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from model_executor.llada import LLaDAModel

from .attention import RaggedBatch, paged_attention
from .decoding import choose_tokens, select_commits
from .kv_store import PagedKVStore
from .policies.base import LayerView
from .policies.elastic import ElasticCache
from .request import Request, StepOutput

# Probe rows (tracked + window) per request that the batched Elastic kernels take.
MAX_PROBE_ROWS = 64
FUSED_POLICIES = ("none", "prefix", "dual", "dkv", "elastic")


@dataclass
class _Decided:
    """What a step decided for one request (either path)."""

    candidates: list[int]
    tokens: list[int]
    confidence: list[float]
    full: bool  # the row pass was a full pass
    num_rows: int  # rows of the row pass
    refresh_start: int | None
    row_layers: int | None = None  # layers the row pass ran (None: all)


@dataclass
class _Segment:
    """One request's rows in a reference-path pass."""

    request: Request
    positions: list[int]  # host copy (row order)
    pos: torch.Tensor  # device positions
    slots: torch.Tensor  # device slots of the rows
    start_layer: int
    full: bool  # rows are every position, in order
    h: torch.Tensor | None = None


class StepRunner:
    """`fused`: None = the fused path where it applies on CUDA (kernels on); True = also
    on CPU (torch versions of its kernels: tests); False = reference path only.
    `refresh_override`, if set, replaces Elastic-Cache's drift decision: it gets the
    request and the start the drift test found (on the fused path: in the layers the row
    pass has run so far), or None, and returns the refresh start to use, or None.
    Benchmarks replay a recorded refresh pattern with it.
    `max_rows`, if set, bounds the rows one pass may compute (its activation memory): a
    batch whose requests could together compute more (a full pass or a refresh computes
    every position of a request) is stepped in consecutive groups that fit. Requests are
    independent, so the tokens are those of one batch."""

    def __init__(self, model: LLaDAModel, store: PagedKVStore, *, fused: bool | None = None,
                 cuda_graphs: bool = True, max_rows: int | None = None):
        self.model = model
        self.store = store
        self.num_layers = model.cfg.n_layers
        self.fused = fused
        self.cuda_graphs = cuda_graphs
        self.max_rows = max_rows
        self.refresh_override: Callable[[Request, int | None], int | None] | None = None
        self.chunking = True  # fused path: stop the row pass where refreshes are expected
        self._fused = None  # FusedStep, made on first use

    # -- the step ----------------------------------------------------------------------------

    @torch.inference_mode()
    def step(self, requests: list[Request]) -> list[StepOutput]:
        if not requests:
            return []
        return [out for group in self._row_groups(requests) for out in self._step(group)]

    def _row_groups(self, requests: list[Request]) -> list[list[Request]]:
        """Consecutive groups whose requests' positions fit `max_rows` (a request longer
        than that runs alone)."""
        if self.max_rows is None or sum(r.total_len for r in requests) <= self.max_rows:
            return [requests]
        groups: list[list[Request]] = [[]]
        rows = 0
        for r in requests:
            if groups[-1] and rows + r.total_len > self.max_rows:
                groups.append([])
                rows = 0
            groups[-1].append(r)
            rows += r.total_len
        return groups

    def _step(self, requests: list[Request]) -> list[StepOutput]:
        rows_of = []
        for r in requests:
            if r.finished:
                raise ValueError(f"request {r.id!r} is already finished")
            if r.slot_map is None:
                raise ValueError(f"request {r.id!r} has no KV pages")
            r.begin_step()
            rows_of.append(r.policy.rows(full=r.needs_full_pass))
            r.needs_full_pass = False
        kern = self._kernels()
        use_fused = self.fused if self.fused is not None else kern
        fused = [i for i, r in enumerate(requests)
                 if use_fused and self._fusable(r, rows_of[i])]
        in_fused = set(fused)
        rest = [i for i in range(len(requests)) if i not in in_fused]
        decided: dict[int, _Decided] = {}
        if fused:
            decided.update(zip(fused, self._fused_step([requests[i] for i in fused],
                                                       [rows_of[i] for i in fused], kern)))
        if rest:
            decided.update(zip(rest, self._reference_step([requests[i] for i in rest],
                                                          [rows_of[i] for i in rest])))
        outputs = []
        for i, r in enumerate(requests):
            d = decided[i]
            self._account(r, d)
            pos, tok = select_commits(r, d.candidates, d.tokens, d.confidence)
            outputs.append(r.commit(pos, tok))
            r.policy.end_step()
        return outputs

    def _kernels(self) -> bool:
        from vllm_elastic import kernels  # without Triton: AVAILABLE is False

        return kernels.enabled(self.model.wte)

    def _fusable(self, r: Request, rows: list[int] | None) -> bool:
        p = r.policy
        if p.name not in FUSED_POLICIES:
            return False
        if isinstance(p, ElasticCache):
            n_probe = len(p.window) + (0 if rows is None else p.n_track)
            return p.params.drift == "heads" and n_probe <= MAX_PROBE_ROWS
        return True

    def _override(self, r: Request, start: int | None) -> int | None:
        if self.refresh_override is not None:
            start = self.refresh_override(r, start)
            if start is not None and not 0 <= start < self.num_layers:
                raise ValueError(f"refresh start {start} outside [0, {self.num_layers})")
        return start

    # -- fused path --------------------------------------------------------------------------

    def _fused_step(self, requests: list[Request], rows_of: list, kern: bool
                    ) -> list[_Decided]:
        decisions = self._fused_path().run(requests, rows_of, kern, self._override_fn(),
                                           self.chunking)
        out = []
        for r, rows, d in zip(requests, rows_of, decisions):
            n = r.total_len if rows is None else len(rows)
            out.append(_Decided(r.candidates(), d.tokens, d.confidence, rows is None, n,
                                d.refresh_start, d.row_layers))
        return out

    def _fused_path(self):
        if self._fused is None:
            from .fused import FusedStep

            self._fused = FusedStep(self.model, self.store, cuda_graphs=self.cuda_graphs)
        return self._fused

    def start_fused_timing(self) -> None:
        """From now on split the fused path's time into host work, waits for the device and
        device time of the passes (`fused_timing()`)."""
        self._fused_path().start_timing()

    def fused_timing(self) -> dict[str, float]:
        """Totals since `start_fused_timing()` (empty if it was not called); stops timing."""
        f = self._fused
        if f is None or f.timing is None:
            return {}
        out = f.timing.report()
        f.stop_timing()
        return out

    def pass_counts(self) -> dict[str, int]:
        """Fused passes run so far: eagerly, captured as CUDA graphs, replayed (and
        captures PyTorch refused)."""
        from .fused.graphs import PassExecutor

        out = dict.fromkeys(PassExecutor.COUNTS, 0)
        for ex in (self._fused.executors.values() if self._fused else ()):
            for k, v in ex.counts.items():
                out[k] += v
        return out

    def _override_fn(self):
        return self._override if self.refresh_override is not None else None

    # -- reference path ----------------------------------------------------------------------

    def _reference_step(self, requests: list[Request], rows_of: list) -> list[_Decided]:
        device = self.model.device
        segments = []
        for r, rows in zip(requests, rows_of):
            full = rows is None
            positions = list(range(r.total_len)) if full else rows
            pos = torch.tensor(positions, dtype=torch.long, device=device)
            seg = _Segment(r, positions, pos, r.slot_map.index_select(0, pos), 0, full)
            seg.h = self.model.embed(r.canvas.index_select(0, pos))
            segments.append(seg)
        final = self._run(segments, 0)
        refresh = []
        for seg in segments:
            r = seg.request
            start = r.policy.refresh_layer(self.num_layers) if not seg.full else None
            if not seg.full:
                start = self._override(r, start)
            if start is not None:
                pos = torch.arange(r.total_len, device=device)
                refresh.append(_Segment(r, list(range(r.total_len)), pos, r.slot_map, start,
                                        True))
        if refresh:
            final.update(self._run(refresh, min(s.start_layer for s in refresh)))
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
        tokens, conf = choose_tokens(logits, requests, [len(c) for c in cand_lists])
        refreshed = {s.request.id: s.start_layer for s in refresh}
        return [_Decided(c, tk, cf, seg.full, len(seg.positions), refreshed.get(r.id))
                for r, seg, c, tk, cf in zip(requests, segments, cand_lists, tokens, conf)]

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
                hooked = [(i, s) for i, s in enumerate(active)
                          if s.request.policy.has_layer_hooks]
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
            q, k, v = layer.qkv(h, pos, model.rope)
            views = []
            for i, s in hooked:
                a, b = batch.row_offsets[i], batch.row_offsets[i + 1]
                view = LayerView(li, layer, store, s.pos, q[a:b], h[a:b], s.full, model.rope)
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
                for _, s, view in views:
                    s.request.policy.after_attention(view)
                h = layer.finish(h, attn)
            else:
                h = self._finish_subsets(layer, li, active, batch, h, q, subsets, views)
        if h is not None:
            self._split(active, h)
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

    @staticmethod
    def _split(active: list[_Segment], h: torch.Tensor) -> None:
        o = 0
        for s in active:
            n = len(s.positions)
            s.h = h[o:o + n]
            o += n

    # -- stats -------------------------------------------------------------------------------

    def _account(self, r: Request, d: _Decided) -> None:
        L = self.num_layers
        st = r.stats
        st.rows_full += r.total_len * L
        st.layers_total += L
        start = d.refresh_start
        if d.full:
            st.full_steps += 1
            st.rows_computed += r.total_len * L
            st.layers_refreshed += L
        elif start is not None:
            st.drift_events += 1
            n = d.num_rows
            st.rows_computed += n * start + r.total_len * (L - start)
            st.layers_refreshed += L - start
            st.speculative_rows += n * max(0, (d.row_layers or L) - start)
        else:
            st.rows_computed += r.policy.rows_computed(d.num_rows, L)
