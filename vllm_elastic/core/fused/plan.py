"""A fused pass's plan: which rows of which requests run layers [first, last), packed.

The step runner describes a pass as segments (one per request: its rows, where their
hidden states come from, which of them Elastic-Cache probes, which decide commits). The
plan packs every index the layers need into one int32 buffer of fixed layout, padded to
bucketed sizes (`PassGeometry`): the same geometry always has the same tensor shapes, so
a CUDA graph captured for it replays any later plan of that geometry after one
host-to-device copy. Padding never touches real data: filler rows have slot -1 (no K/V
or layer-input write) and belong to no request; filler requests have no rows and no keys.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np

from vllm_elastic.kernels.grid import attention_block_m, probe_block_m, row_blocks

if TYPE_CHECKING:
    from ..request import Request


def bucket(n: int, step: int) -> int:
    """n rounded up: to a multiple of `step` up to 8 steps, then to an eighth of its
    power of two (at most 12.5% of padding, few distinct sizes)."""
    if n <= 0:
        return 0
    if n <= 8 * step:
        return -(-n // step) * step
    s = 1 << (n.bit_length() - 4)
    return -(-n // s) * s


def bucket_pow2(n: int, minimum: int = 1) -> int:
    """n rounded up to a power of two (0 stays 0)."""
    if n <= 0:
        return 0
    return max(minimum, 1 << (n - 1).bit_length())


@dataclass
class PassSegment:
    """One request's rows in a pass."""

    request: "Request"
    positions: np.ndarray  # int64 row positions, in row order
    full: bool  # the rows are every position, in order
    keep_x: bool  # write the rows' layer inputs to the store
    slots: np.ndarray  # int64 slot of every position of the request
    n_track: int = 0  # leading rows whose old attention is probed (Elastic drift test)
    window_rows: np.ndarray | None = None  # row indices whose attention mass picks tracks
    decide: bool = False  # this pass decides the request's refresh (drift test)
    cand_rows: np.ndarray | None = None  # row indices whose logits decide commits

    @property
    def num_rows(self) -> int:
        return int(self.positions.shape[0])

    @property
    def num_probe(self) -> int:
        w = 0 if self.window_rows is None else int(self.window_rows.shape[0])
        return self.n_track + w


@dataclass(frozen=True)
class PassGeometry:
    """The static shape of a fused pass (a CUDA graph key)."""

    first: int
    last: int
    T: int  # rows (padded)
    R: int  # requests (padded)
    M: int  # keys per request (padded)
    NT: int  # tracked rows (padded)
    P: int  # probe rows (padded)
    C: int  # candidate rows (padded)
    NB: int  # attention row blocks (padded)
    block_m: int
    probe_block_m: int
    track_k: int  # picks per layer
    n_stop: int
    from_embed: bool
    write_x: bool
    decide: bool
    decode: bool  # argmax + confidence in the pass (else: candidates' hidden states out)

    @property
    def num_layers(self) -> int:
        return self.last - self.first

    def int_fields(self) -> list[tuple[str, tuple[int, ...]]]:
        T, R, M, NT, P, C = self.T, self.R, self.M, self.NT, self.P, self.C
        return [
            ("tokens", (T,)), ("pos", (T,)), ("slot", (T,)), ("x_slot", (T,)),
            ("old_of_row", (T,)), ("row_start", (R + 1,)), ("kv_len", (R,)),
            ("slot_table", (R, M)), ("blk_req", (self.NB,)), ("blk_row", (self.NB,)),
            ("probe_idx", (P,)), ("probe_start", (R + 1,)), ("n_track", (R,)),
            ("win_off", (R,)), ("old_start", (R + 1,)), ("track_pos", (NT,)),
            ("t_req", (NT,)), ("is_mask", (R, M) if P else (0,)),
            ("key_row", (R, M) if NT else (0,)), ("gamma", (R,)),
            ("decides", (R,)), ("cand_idx", (C,)), ("cand_flag", (C,)),
            ("stop_ids", (self.n_stop,)),
        ]

    def out_layout(self) -> dict[str, tuple[int, int]]:
        """(offset, length) of each part of the float64 output (one device-to-host copy)."""
        parts, o = {}, 0
        for name, n in (("tokens", self.C if self.decode else 0),
                        ("conf", self.C if self.decode else 0),
                        ("start", self.R if self.decide else 0),
                        ("picks", self.R * self.num_layers * self.track_k if self.P else 0)):
            parts[name] = (o, n)
            o += -(-n // 2) * 2  # every part 16-byte aligned
        parts["total"] = (o, 0)
        return parts


def _field_offsets(g: PassGeometry) -> tuple[list[tuple[str, tuple[int, ...], int]], int]:
    """(name, shape, offset) of every field of the packed int32 buffer, and its length;
    every field starts 16-byte aligned (Triton specialises kernels on pointer alignment)."""
    out, o = [], 0
    for name, shape in g.int_fields():
        out.append((name, shape, o))
        o += -(-int(np.prod(shape)) // 4) * 4
    return out, o


class PassTensors:
    """Named views of a plan's packed int32 buffer (device or host)."""

    def __init__(self, buf, g: PassGeometry):
        for name, shape, o in _field_offsets(g)[0]:
            setattr(self, name, buf[o:o + int(np.prod(shape))].reshape(shape))


def int_buffer_size(g: PassGeometry) -> int:
    """Length of the packed int32 buffer of a geometry."""
    return _field_offsets(g)[1]


@dataclass
class PassPlan:
    """Segments + geometry; `fill` writes the packed indices into a host buffer."""

    segments: list[PassSegment]
    geometry: PassGeometry
    row_start: list[int] = field(default_factory=list)  # real segments' row offsets
    cand_start: list[int] = field(default_factory=list)  # their candidates' offsets

    @classmethod
    def build(cls, segments: list[PassSegment], first: int, last: int, *, from_embed: bool,
              write_x: bool, decide: bool, logits: bool, decode: bool, track_k: int,
              n_stop: int) -> "PassPlan":
        """from_embed: the rows start from their token embeddings (else from `h_in`);
        logits: the candidates' final hidden states are wanted (decoded in the pass when
        `decode`)."""
        n_rows = [s.num_rows for s in segments]
        T = sum(n_rows)
        R = len(segments)
        M = max(int(s.slots.shape[0]) for s in segments)
        NT = sum(s.n_track for s in segments)
        P = sum(s.num_probe for s in segments)
        C = sum(0 if s.cand_rows is None else int(s.cand_rows.shape[0]) for s in segments)
        C = C if logits else 0
        bm = attention_block_m(max(n_rows))
        NB = sum(-(-n // bm) for n in n_rows)
        max_probe = max(s.num_probe for s in segments)
        g = PassGeometry(
            # Counts that drift step by step (candidates shrink as tokens commit, tracked
            # and probe rows follow the picks) in powers of two: few geometries to capture.
            first=first, last=last, T=bucket(T, 16), R=bucket_pow2(R), M=bucket(M, 64),
            NT=bucket_pow2(NT, 16), P=bucket_pow2(P, 16), C=bucket_pow2(C, 16),
            NB=bucket_pow2(NB),  # a window step at batch 1 is one block: split over keys
            block_m=bm, probe_block_m=probe_block_m(max_probe) if P else 0,
            track_k=track_k if P else 0, n_stop=n_stop,
            from_embed=from_embed, write_x=write_x, decide=decide and NT > 0,
            decode=decode and C > 0)
        plan = cls(segments, g)
        plan.row_start = [0] + list(np.cumsum(n_rows))
        return plan

    def fill(self, t: PassTensors, mask_id: int, stop_ids: tuple[int, ...]) -> None:
        """Write the plan into `t` (host views of the packed buffer)."""
        g, segs = self.geometry, self.segments
        T, R = self.row_start[-1], len(segs)
        pos = np.concatenate([s.positions for s in segs])
        slots = np.concatenate([s.slots[s.positions] for s in segs])
        t.pos[:T], t.pos[T:] = pos, 0
        t.slot[:T], t.slot[T:] = slots, -1
        keep = np.concatenate([np.full(s.num_rows, s.keep_x) for s in segs])
        t.x_slot[:T] = np.where(keep, slots, -1)
        t.x_slot[T:] = -1
        if g.from_embed:
            t.tokens[:T] = np.concatenate([s.request.token_array[s.positions] for s in segs])
            t.tokens[T:] = 0
        t.row_start[:R + 1] = self.row_start
        t.row_start[R + 1:] = T
        t.kv_len[:] = 0
        t.slot_table[:] = 0
        for i, s in enumerate(segs):
            n = int(s.slots.shape[0])
            t.kv_len[i] = n
            t.slot_table[i, :n] = s.slots
        req, rows = row_blocks(self.row_start, g.block_m)
        n = req.shape[0]
        t.blk_req[:n], t.blk_req[n:] = req, -1
        t.blk_row[:n], t.blk_row[n:] = rows, 0
        # Elastic probes: tracked rows first, then window rows, per request.
        t.old_of_row[:] = -1
        t.n_track[:] = 0
        t.win_off[:] = 0
        if g.P:
            probe, pstart, ostart, tpos, treq = [], [0], [0], [], []
            for i, s in enumerate(segs):
                a = self.row_start[i]
                nt = s.n_track
                if nt:
                    t.old_of_row[a:a + nt] = np.arange(ostart[-1], ostart[-1] + nt)
                    tpos.append(s.positions[:nt])
                    treq.append(np.full(nt, i))
                    probe.append(np.arange(a, a + nt))
                if s.window_rows is not None:
                    probe.append(a + s.window_rows)
                pstart.append(pstart[-1] + s.num_probe)
                ostart.append(ostart[-1] + nt)
                t.n_track[i] = nt
                t.win_off[i] = nt
            P, NT = pstart[-1], ostart[-1]
            t.probe_idx[:P] = np.concatenate(probe) if probe else []
            t.probe_idx[P:] = 0
            t.probe_start[:R + 1], t.probe_start[R + 1:] = pstart, P
            t.old_start[:R + 1], t.old_start[R + 1:] = ostart, NT
            t.track_pos[:NT] = np.concatenate(tpos) if tpos else []
            t.track_pos[NT:] = 0
            t.t_req[:NT] = np.concatenate(treq) if treq else []
            t.t_req[NT:] = g.R  # filler rows add into a sink column
            t.is_mask[:] = 0
            for i, s in enumerate(segs):
                tok = s.request.token_array
                t.is_mask[i, :tok.shape[0]] = tok == mask_id
            if g.NT:  # key -> this pass's row at that position (the old key is kept there)
                t.key_row[:] = -1
                for i, s in enumerate(segs):
                    if s.n_track:
                        a = self.row_start[i]
                        t.key_row[i, s.positions] = np.arange(a, a + s.num_rows)
        else:
            t.probe_start[:] = 0
            t.old_start[:] = 0
        t.gamma[:] = 0
        t.decides[:] = 0  # (a forced refresh is decided on the host)
        for i, s in enumerate(segs):
            if s.decide:
                t.gamma[i:i + 1].view(np.float32)[0] = s.request.params.policy.gamma
                t.decides[i] = 1
        # Candidates.
        cidx, cflag, cstart = [], [], [0]
        for i, s in enumerate(segs):
            if s.cand_rows is not None and g.C:
                cidx.append(self.row_start[i] + s.cand_rows)
                on = s.request.params.decode.confidence_eos_eot_inf
                cflag.append(np.full(s.cand_rows.shape[0], int(on)))
            cstart.append(cstart[-1] + (0 if s.cand_rows is None or not g.C
                                        else s.cand_rows.shape[0]))
        C = cstart[-1]
        self.cand_start = cstart
        t.cand_idx[:C] = np.concatenate(cidx) if cidx else []
        t.cand_idx[C:] = 0
        t.cand_flag[:C] = np.concatenate(cflag) if cflag else []
        t.cand_flag[C:] = 0
        t.stop_ids[:] = stop_ids
