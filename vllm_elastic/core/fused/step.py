"""The fused path of a step: passes of padded batches, the row pass chunked where the
refresh is expected.

A step is a sequence of fused passes (`layers`), each a set of units (a request's
rows from one layer on, with where their inputs come from), run as one padded batch per
stretch of layers between the units' start layers (the running rows are carried over):

1. The row pass: every request's policy rows from their embeddings, layers [0, c).
2. Elastic-Cache's decisions for the layers tested so far (one host transfer).
3. If c < L: the refreshes found so far (each from its start layer, all positions, inputs
   from the layer-input cache) and every other request's rows (carried from 1) run on
   together to the last layer; the drift test of the continuing rows goes on there, and
   the refreshes it finds run as a third pass.
4. The candidates' tokens come from the last pass a request was in.

c is where the batch's requests are expected to refresh: the median of their last
refresh starts (L, i.e. no chunk, while most do not refresh). Every row is computed
exactly as in one unchunked row pass followed by the refreshes (the drift test at layer
l still sees this step's rows up to l); chunking only skips the row-pass layers a refresh
recomputes anyway, at the price of one more host transfer.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace

import numpy as np
import torch

from ..decoding import choose_tokens
from ..policies.elastic import ElasticCache
from ..request import Request
from .graphs import PassExecutor
from .layers import PassBuffers
from .plan import PassPlan, PassSegment


@dataclass
class FusedDecision:
    """What the fused passes decided for one request this step."""

    tokens: list[int]
    confidence: list[float]
    refresh_start: int | None
    row_layers: int  # layers the row pass ran (c, or L)


@dataclass
class StepTiming:
    """Where the fused steps' time went since `FusedStep.start_timing()`."""

    steps: int = 0
    passes: int = 0
    host_s: float = 0.0  # planning, uploads, launches, commits' inputs: the host's own work
    wait_s: float = 0.0  # blocked on the device (decision copies)
    events: list = field(default_factory=list)  # (start, end) CUDA events of every pass

    def report(self) -> dict[str, float]:
        """Totals; device time of the passes from their events (synchronizes)."""
        gpu = 0.0
        if self.events:
            self.events[-1][1].synchronize()
            gpu = sum(a.elapsed_time(b) for a, b in self.events) / 1e3
        return {"steps": self.steps, "passes": self.passes, "host_s": self.host_s,
                "wait_s": self.wait_s, "gpu_s": gpu}


@dataclass
class _Unit:
    """A request's rows from layer `start` on, and where their inputs come from."""

    index: int  # the request's index in the step
    seg: PassSegment
    start: int
    src: str  # "embed" | "rows" (a previous pass's outputs) | "cache" (layer inputs)
    src_bufs: PassBuffers | None = None  # "rows", or "cache" overlaid with rows
    src_rows: np.ndarray | None = None  # rows of src_bufs.h_out
    overlay_pos: np.ndarray | None = None  # "cache": positions taken from src_rows instead


class FusedStep:
    def __init__(self, model, store, *, cuda_graphs: bool = True):
        self.model = model
        self.store = store
        self.L = model.cfg.n_layers
        self.cuda_graphs = cuda_graphs
        self.executors: dict[bool, PassExecutor] = {}
        self.timing: StepTiming | None = None  # set by start_timing()

    # -- timing ------------------------------------------------------------------------------

    def start_timing(self) -> None:
        """From now on, split each step's time into host work, waits for the device, and
        device time of the passes (CUDA events around every pass: a small overhead)."""
        self.timing = StepTiming()
        for ex in self.executors.values():
            ex.events = self.timing.events

    def stop_timing(self) -> None:
        self.timing = None
        for ex in self.executors.values():
            ex.events = None

    def _results(self, bufs: PassBuffers) -> dict:
        if self.timing is None:
            return bufs.results()
        t = time.perf_counter()
        res = bufs.results()
        self.timing.wait_s += time.perf_counter() - t
        return res

    # -- one pass ----------------------------------------------------------------------------

    def _executor(self, kern: bool) -> PassExecutor:
        ex = self.executors.get(kern)
        if ex is None:
            ex = PassExecutor(self.model, self.store, kernels=kern,
                              graphs=kern and self.cuda_graphs)
            ex.events = self.timing.events if self.timing is not None else None
            self.executors[kern] = ex
        return ex

    def _run_units(self, units: list[_Unit], end: int, kern: bool) -> list[tuple]:
        """Sub-passes from each distinct start layer to the next (the last to `end`);
        returns (plan, buffers, units in row order) per sub-pass."""
        layers = sorted({u.start for u in units})
        active: list[_Unit] = []
        out = []
        prev = None
        for j, first in enumerate(layers):
            last = layers[j + 1] if j + 1 < len(layers) else end
            carried = sum(u.seg.num_rows for u in active)
            new = sorted((u for u in units if u.start == first), key=lambda u: u.src == "cache")
            active = active + new
            segs = [u.seg for u in active]
            from_embed = first == 0 and all(u.src == "embed" for u in active)
            plan, bufs = self._load(segs, first, last, kern, from_embed,
                                    decide=any(u.seg.decide for u in active),
                                    logits=last == self.L)
            if not from_embed:
                self._fill_inputs(bufs, prev, carried, new, first)
            self._executor(kern).launch(bufs)
            if self.timing is not None:
                self.timing.passes += 1
            out.append((plan, bufs, list(active)))
            prev = bufs
        return out

    def _load(self, segs, first, last, kern, from_embed, decide, logits):
        special = segs[0].request.special
        uniform = all(s.request.params.decode.temperature == 0
                      and not s.request.params.decode.logits_eos_inf for s in segs)
        track_k = max((s.request.policy.params.track_num for s in segs if s.num_probe),
                      default=0)
        plan = PassPlan.build(segs, first, last, from_embed=from_embed,
                              write_x=self.store.x is not None, decide=decide,
                              logits=logits, decode=uniform, track_k=track_k,
                              n_stop=len(special.stop))
        bufs = self._executor(kern).buffers(plan.geometry)
        plan.fill(bufs.host, special.mask, special.stop)
        bufs.upload()
        return plan, bufs

    def _fill_inputs(self, bufs: PassBuffers, prev: PassBuffers | None, carried: int,
                     new: list[_Unit], layer: int) -> None:
        """h_in: the carried rows of the previous sub-pass, then each new unit's rows (a
        previous pass's outputs, or the layer's cached inputs, overlaid with this step's
        rows where a refresh starts at the layer the row pass stopped at)."""
        h_in, dev = bufs.h_in, bufs.h_in.device
        if carried:
            h_in[:carried].copy_(prev.h_out[:carried])
        caches = []  # (dest offset, n): runs of rows read from the layer-input cache
        copies: dict[int, list] = {}  # source buffers -> [buffers, dest rows, source rows]
        a = carried
        for u in new:
            n = u.seg.num_rows
            if u.src == "cache":
                if caches and sum(caches[-1]) == a:
                    caches[-1] = (caches[-1][0], caches[-1][1] + n)
                else:
                    caches.append((a, n))
            if u.src_bufs is not None:  # "rows", or a cache unit's overlay
                c = copies.setdefault(id(u.src_bufs), [u.src_bufs, [], []])
                c[1].append(a + (np.arange(n) if u.overlay_pos is None else u.overlay_pos))
                c[2].append(u.src_rows)
            a += n
        x = self.store.x[layer]
        for a, n in caches:  # first: the overlays write over these rows
            torch.index_select(x, 0, bufs.dev.slot[a:a + n], out=h_in[a:a + n])
        for src, dst, rows in copies.values():
            idx = torch.from_numpy(np.stack([np.concatenate(dst), np.concatenate(rows)]))
            idx = idx.pin_memory().to(dev, non_blocking=True) if dev.type == "cuda" else idx
            h_in.index_copy_(0, idx[0], src.h_out.index_select(0, idx[1]))

    def _decode(self, plan: PassPlan, bufs: PassBuffers, res: dict, which: list[int]
                ) -> dict[int, tuple[list[int], list[float]]]:
        """Tokens and confidences of plan segments `which` (the pass decided them, or
        handed their hidden states over for sampling with the requests' generators)."""
        cs = plan.cand_start
        if plan.geometry.decode:
            return {i: (res["tokens"][cs[i]:cs[i + 1]].astype(np.int64).tolist(),
                        res["conf"][cs[i]:cs[i + 1]].tolist()) for i in which}
        rows = torch.cat([torch.arange(cs[i], cs[i + 1]) for i in which])
        logits = self.model.logits(bufs.cand_h.index_select(0, rows.to(bufs.cand_h.device)))
        toks, conf = choose_tokens(logits, [plan.segments[i].request for i in which],
                                   [cs[i + 1] - cs[i] for i in which])
        return dict(zip(which, zip(toks, conf)))

    # -- the step ----------------------------------------------------------------------------

    def row_segment(self, r: Request, rows: list[int] | None) -> PassSegment:
        full = rows is None
        positions = (np.arange(r.total_len, dtype=np.int64) if full
                     else np.asarray(rows, dtype=np.int64))
        inv = None
        if not full:
            inv = np.full(r.total_len, -1, dtype=np.int64)
            inv[positions] = np.arange(positions.shape[0])
        cands = np.asarray(r.candidates(), dtype=np.int64)
        cand_rows = cands if full else inv[cands]
        if (cand_rows < 0).any():
            raise RuntimeError(f"request {r.id!r}: policy {r.policy.name!r} left candidates "
                               "out of its rows")
        seg = PassSegment(r, positions, full, r.policy.keeps_layer_inputs,
                          r.host_slots(self.store.page_size), cand_rows=cand_rows)
        p = r.policy
        if isinstance(p, ElasticCache):
            win = np.asarray(p.window, dtype=np.int64)
            seg.window_rows = win if full else inv[win]
            seg.n_track = 0 if full else p.n_track
            seg.decide = not full
        return seg

    def _refresh_unit(self, i: int, seg: PassSegment, start: int) -> _Unit:
        """Every position of row segment `seg`'s request from layer `start` on."""
        r = seg.request
        rs = PassSegment(r, np.arange(r.total_len, dtype=np.int64), True, True, seg.slots,
                         cand_rows=seg.positions[seg.cand_rows])
        if isinstance(r.policy, ElasticCache):
            rs.window_rows = np.asarray(r.policy.window, dtype=np.int64)
        return _Unit(i, rs, start, "cache")

    def chunk_layer(self, segs: list[PassSegment]) -> int:
        """Where the row pass stops: the median expected refresh start of the batch's
        deciding requests (their last refresh), or L."""
        preds = sorted(s.request.policy.last_refresh if s.request.policy.last_refresh
                       is not None else self.L for s in segs if s.decide)
        if not preds:
            return self.L
        c = preds[(len(preds) - 1) // 2]
        return c if 0 < c < self.L - 1 else self.L

    def run(self, requests: list[Request], rows_of: list, kern: bool,
            override: Callable[[Request, int | None], int | None] | None,
            chunking: bool = True) -> list[FusedDecision]:
        """override: replaces the drift test's decision (called with the start found in
        the layers the row pass has tested so far, or None)."""
        if self.timing is None:
            return self._run(requests, rows_of, kern, override, chunking)
        t = time.perf_counter()
        wait = self.timing.wait_s
        out = self._run(requests, rows_of, kern, override, chunking)
        self.timing.steps += 1
        self.timing.host_s += time.perf_counter() - t - (self.timing.wait_s - wait)
        return out

    def _run(self, requests: list[Request], rows_of: list, kern: bool,
             override: Callable[[Request, int | None], int | None] | None,
             chunking: bool) -> list[FusedDecision]:
        L = self.L
        segs = [self.row_segment(r, rows) for r, rows in zip(requests, rows_of)]
        c = self.chunk_layer(segs) if chunking else L
        [(plan, bufs, _)] = self._run_units(
            [_Unit(i, s, 0, "embed") for i, s in enumerate(segs)], c, kern)
        res = self._results(bufs)
        picks: dict[int, np.ndarray] = {}
        g = plan.geometry
        if g.P:
            allp = res["picks"].reshape(g.R, c, g.track_k)
            for i, s in enumerate(segs):
                if s.num_probe:
                    picks[i] = np.zeros((L, g.track_k), dtype=np.int64)
                    picks[i][:c] = allp[i]
        starts: dict[int, int] = {}  # refresh now (start <= c)
        later: dict[int, int | None] = {}  # decided by the override, applied after
        for i, s in enumerate(segs):
            if not s.decide:
                continue
            found = int(res["start"][i]) if g.decide else L
            found = found if found <= c and found < L else None
            if s.request.policy.params.force_refresh:
                start = 0
            elif override is not None:
                start = override(s.request, found)
                if start is not None and start > c:
                    later[i] = start
                    continue
                later[i] = None
            else:
                start = found
            if start is not None:
                starts[i] = start
        dec: dict[int, tuple] = {}
        final_start = dict(starts)
        if c == L:
            keep = [i for i in range(len(segs)) if i not in starts]
            if keep:
                dec.update(self._decode(plan, bufs, res, keep))
            round2 = starts
            cont_passes = []
        else:
            units = []
            for i, s in enumerate(segs):
                a, b = plan.row_start[i], plan.row_start[i + 1]
                if i in starts:
                    u = self._refresh_unit(i, s, starts[i])
                    if starts[i] == c:  # its layer-c inputs are this step's rows
                        u.src_bufs, u.src_rows = bufs, np.arange(a, b)
                        u.overlay_pos = s.positions
                    units.append(u)
                else:  # its drift test goes on, unless the override has decided it
                    cont = replace(s, decide=s.decide and i not in later)
                    units.append(_Unit(i, cont, c, "rows", bufs, np.arange(a, b)))
            cont_passes = self._run_units(units, L, kern)
            plan_b, bufs_b, members = cont_passes[-1]
            res_b = self._results(bufs_b)
            gb = plan_b.geometry
            round2 = {}
            for k, u in enumerate(members):
                if u.src == "rows" and u.seg.decide:
                    found = int(res_b["start"][k]) if gb.decide else L
                    if found < L:
                        round2[u.index] = found
            for i, start in later.items():
                if start is not None:
                    round2[i] = start
            final_start.update(round2)
            done = [k for k, u in enumerate(members) if u.index not in round2]
            dec.update({members[k].index: v for k, v in
                        self._decode(plan_b, bufs_b, res_b, done).items()})
        passes = list(cont_passes)
        if round2:
            r2 = self._run_units([self._refresh_unit(i, segs[i], s) for i, s in
                                  round2.items()], L, kern)
            plan_r, bufs_r, members = r2[-1]
            res_r = self._results(bufs_r)
            dec.update({members[k].index: v for k, v in
                        self._decode(plan_r, bufs_r, res_r, list(range(len(members)))).items()})
            passes += r2
        for plan_x, bufs_x, members in passes:  # picks of the layers these passes ran
            gx = plan_x.geometry
            if not gx.P:
                continue
            allp = self._results(bufs_x)["picks"].reshape(gx.R, gx.num_layers, gx.track_k)
            for k, u in enumerate(members):  # later passes overwrite what they recomputed
                if u.seg.num_probe and u.index in picks:
                    picks[u.index][gx.first:gx.last] = allp[k]
        out = []
        for i, s in enumerate(segs):
            pol = s.request.policy
            if i in picks:
                pol.set_track(picks[i])
            if isinstance(pol, ElasticCache):
                pol.last_refresh = final_start.get(i)
            toks, conf = dec[i]
            out.append(FusedDecision(toks, conf, final_start.get(i), c))
        return out
