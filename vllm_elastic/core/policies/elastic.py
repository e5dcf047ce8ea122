"""Elastic-Cache: attention-aware drift test, depth-aware refresh, sliding window.

Each step the window (first beta masked positions), the tokens committed last step and
the tracked tokens are the rows. At every layer the tracked tokens' attention now is
compared with their attention before this step (recomputed from the layer's cached input
and the keys before this step's write): when the similarity falls below gamma at layer l,
every row of the sequence is recomputed from layer l+1 on, starting from that layer's
cached inputs. Each layer also picks the committed token the window attends to most; the
union over layers is tracked next step. Step 0 is a full pass.

Similarity: "heads" (the authors' code) takes the cosine over the heads axis of the
(heads, tracked, keys) weights and averages it; "rows" (the paper) takes the cosine of
each head's attention row and averages. Under tensor parallelism both are computed from
all-reduced partial sums, so every rank takes the same decision.
"""

from __future__ import annotations

import torch

from ..attention import attention_probs
from .base import CachePolicy, LayerView

_UNSET = object()


class ElasticCache(CachePolicy):
    name = "elastic"
    keeps_layer_inputs = True
    has_layer_hooks = True
    needs_layer_state = True

    def __init__(self, params, request):
        super().__init__(params, request)
        self.track: list[int] = []
        self._picks: list[torch.Tensor] = []  # per layer: the positions picked this step
        self._sims: list[torch.Tensor] = []  # per tested layer: similarity (device scalar)
        self._old: torch.Tensor | None = None
        self._n_track = 0
        self._n_window = 0
        self._is_mask: torch.Tensor | None = None
        self._window_pos: torch.Tensor | None = None
        # Set by the batched CUDA path (ElasticBatch) instead of the per-layer hooks.
        self._batched_start: object = _UNSET
        self._batched_picks: torch.Tensor | None = None

    # -- plan --------------------------------------------------------------------------------

    def rows(self, full: bool = False) -> list[int] | None:
        r = self.request
        self._picks, self._sims = [], []
        self._is_mask = r.canvas == r.special.mask
        window = r.masked[:r.params.decode.window] if self.params.block_caching else r.masked
        self._window_pos = torch.tensor(window, dtype=torch.long, device=r.canvas.device)
        if r.step_index == 0 or full:
            self._n_track, self._n_window = 0, len(window)
            return None
        seen = set()
        out = []
        for group in (self.track, r.new_positions, window):
            for p in group:
                if p not in seen:
                    seen.add(p)
                    out.append(p)
        self._n_track = len(self.track)  # tracked rows come first
        self._n_window = len(window)
        return out

    # -- per layer ---------------------------------------------------------------------------

    def _tp(self, view: LayerView):
        return view.layer.tp

    def before_kv_write(self, view: LayerView) -> None:
        self._old = None
        if view.refreshing or self._n_track == 0:
            return
        r = self.request
        slots = r.slot_map
        pos = view.positions[:self._n_track]
        x_old = view.store.read_x(view.index, slots.index_select(0, pos))
        q_old = view.layer.query(x_old, pos, view.rope)
        k_old = view.store.k[view.index].index_select(0, slots)
        self._old = attention_probs(q_old, k_old)  # [heads, tracked, keys]

    def after_attention(self, view: LayerView) -> None:
        r = self.request
        k_now = view.store.k[view.index].index_select(0, r.slot_map)
        tp = self._tp(view)
        if view.refreshing:
            win_q = view.q.index_select(0, self._window_pos)
        else:
            win_q = view.q[view.q.shape[0] - self._n_window:]
            if self._old is not None:
                now = attention_probs(view.q[:self._n_track], k_now)
                self._sims.append(self._similarity(self._old, now, tp))
                self._old = None
        # Attention mass the window gives each key, over heads and window rows.
        mass = attention_probs(win_q, k_now).sum(dim=(0, 1))
        mass = tp.all_reduce(mass)
        mass = mass.masked_fill(self._is_mask, 0.0)
        k = min(self.params.track_num, mass.shape[0])
        pick = mass.topk(k).indices
        if len(self._picks) > view.index:  # a refresh re-picks its layers
            self._picks[view.index] = pick
        else:
            self._picks.append(pick)

    def _similarity(self, old: torch.Tensor, now: torch.Tensor, tp) -> torch.Tensor:
        if self.params.drift == "heads":
            parts = torch.stack([(old * now).sum(0), (old * old).sum(0), (now * now).sum(0)])
            parts = tp.all_reduce(parts)
            cos = parts[0] / (parts[1].sqrt() * parts[2].sqrt()).clamp_min(1e-8)
            return cos.mean()
        cos = torch.nn.functional.cosine_similarity(old, now, dim=-1, eps=1e-8)  # [heads, t]
        total = tp.all_reduce(cos.sum().reshape(1))[0]
        return total / (cos.shape[1] * cos.shape[0] * tp.world_size)

    def refresh_layer(self, num_layers: int) -> int | None:
        if self._batched_start is not _UNSET:  # decided by ElasticBatch.refresh_layers
            return self._batched_start
        if self.params.force_refresh:
            # Every row recomputed from the cached inputs of layer 0 (the embeddings, exact
            # for every row): the refresh path itself, equal to full recompute.
            return 0
        if not self._sims:
            return None
        below = (torch.stack(self._sims) < self.params.gamma).nonzero()
        if below.numel() == 0:
            return None
        start = int(below[0, 0]) + 1
        return start if start < num_layers else None

    def end_step(self) -> None:
        self._batched_start = _UNSET
        if self._batched_picks is not None:  # host copy made by ElasticBatch.finish_step
            picks = self._batched_picks[:, :self.params.track_num]
            self.track = sorted(set(picks.flatten().tolist()))
            self._batched_picks = None
            self._picks = []
            return
        if self._picks:
            self.track = sorted(set(torch.cat(self._picks).tolist()))
        self._picks = []


class ElasticBatch:
    """The per-layer hooks of every Elastic request of a step, batched (CUDA kernels).

    Same decisions as the per-request hooks above (drift "heads"), but each layer costs a
    fixed number of launches whatever the batch size: the tracked rows' old attention
    (`probe_old`, before the K/V write) and, after attention, the drift cosine and the
    window's attention mass for all requests at once (`probe_now`); the picks and
    similarities stay on the device in [requests, layers] tensors. After the row pass one
    host transfer decides every refresh (`refresh_layers`); the picks reach the host with
    the step's final sync (`finish_step`, a non-blocking copy into pinned memory).

    Per pass (`begin_pass`, at every change of the batch's segments) it builds the probe
    rows: for a row-pass request its tracked rows (first) and its window rows (last); for
    a refreshing request (full pass or refresh pass) its window positions.
    """

    def __init__(self, policies: list[ElasticCache], num_layers: int, device: torch.device):
        self.policies = policies
        self.row_of = {id(p): i for i, p in enumerate(policies)}
        n = len(policies)
        self.num_layers = num_layers
        self.device = device
        self.track_num = max(p.params.track_num for p in policies)
        # Row n is a sink for batch members that are not in this object.
        self.sims = torch.full((n + 1, num_layers), float("inf"), device=device)
        self.picks = torch.zeros((n + 1, num_layers, self.track_num), dtype=torch.long,
                                 device=device)
        self.gamma = _to_device([p.params.gamma for p in policies] + [0.0], device,
                                torch.float32)
        self._pass = None

    @staticmethod
    def eligible(policy) -> bool:
        return isinstance(policy, ElasticCache) and policy.params.drift == "heads"

    def begin_pass(self, entries: list, row_offsets: list[int], meta: dict,
                   first_layer: int) -> None:
        """entries: per batch segment (policy or None, refreshing, positions tensor, slots
        tensor), from `first_layer` on (until the next `begin_pass` or `end_pass`)."""
        self.end_pass()
        dev = self.device
        probe, starts, n_track, win_off, state_rows = [], [0], [], [], []
        track_pos, track_slots, old_starts, t_req = [], [], [0], []
        masks = []
        sink = len(self.policies)
        for i, (pol, refreshing, pos, slots) in enumerate(entries):
            off, n = row_offsets[i], row_offsets[i + 1] - row_offsets[i]
            row = self.row_of.get(id(pol), sink) if pol is not None else sink
            if row == sink:
                starts.append(starts[-1])
                n_track.append(0)
                win_off.append(0)
                old_starts.append(old_starts[-1])
                state_rows.append(sink)
                masks.append(torch.zeros(1, dtype=torch.bool, device=dev))
                continue
            state_rows.append(row)
            masks.append(pol._is_mask)
            if refreshing:
                nt, nw = 0, len(pol._window_pos)
                probe.append(pol._window_pos + off)
            else:
                nt, nw = pol._n_track, pol._n_window
                if nt:
                    probe.append(torch.arange(off, off + nt, device=dev))
                    track_pos.append(pos[:nt])
                    track_slots.append(slots[:nt])
                probe.append(torch.arange(off + n - nw, off + n, device=dev))
            starts.append(starts[-1] + nt + nw)
            t_req += [i] * nt
            n_track.append(nt)
            win_off.append(nt)
            old_starts.append(old_starts[-1] + nt)
        # One host->device copy; every part starts 16-byte aligned (Triton specialises
        # on pointer alignment: unaligned parts would compile new kernel variants).
        host, spans = [], []
        for part in (starts, n_track, win_off, old_starts, state_rows, t_req):
            spans.append((len(host), len(part)))
            host += part + [0] * (-len(part) % 4)
        ints = _to_device(host, dev, torch.int32)
        R = len(entries)
        parts = [ints[a:a + n] for a, n in spans]
        max_len = meta["slot_table"].shape[1]
        L = self.num_layers
        n_old = len(t_req)
        self._pass = {
            "probe_idx": torch.cat(probe) if probe else torch.zeros(0, dtype=torch.long,
                                                                    device=dev),
            "starts": parts[0], "n_track": parts[1], "win_off": parts[2],
            "old_starts": parts[3], "state_rows": parts[4].long(),
            "max_rows": max(b - a for a, b in zip(starts, starts[1:])) if R else 0,
            "any_track": bool(track_pos),
            "track_pos": torch.cat(track_pos) if track_pos else None,
            "track_slots": torch.cat(track_slots) if track_slots else None,
            "is_mask": torch.nn.utils.rnn.pad_sequence(masks, batch_first=True),
            "meta": meta,
            "old": None,
            "t_req": parts[5].long(),
            # Per layer of this pass: the kernels' sums (zeroed once), reduced in end_pass.
            "first": first_layer, "last": first_layer - 1,
            "mass": torch.zeros((L, R, max_len), dtype=torch.float32, device=dev),
            "acc": torch.zeros((L, 3, n_old, max_len), dtype=torch.float32, device=dev),
        }

    def before_kv_write(self, li: int, layer, store, rope) -> None:
        """Old attention of the tracked rows (layer li's K before this step's write)."""
        from vllm_elastic.kernels import probe_old, rope_kv_write_triton
        from vllm_elastic.kernels.layer_ops import query_projection

        ps = self._pass
        ps["old"] = None
        if not ps["any_track"]:
            return
        x_old = store.read_x(li, ps["track_slots"])
        q_old = rope_kv_write_triton(query_projection(layer, x_old), ps["track_pos"], None,
                                     rope.cos, rope.sin, None, None)
        m = ps["meta"]
        ps["old"] = probe_old(q_old, ps["old_starts"], m["kv_lens"], m["slot_table"],
                              store.k[li], ps["max_rows"])

    def after_attention(self, li: int, q: torch.Tensor, store) -> None:
        """This layer's drift cosines and window mass for every request (3 launches)."""
        from vllm_elastic.kernels import probe_now

        ps = self._pass
        m = ps["meta"]
        qp = q.index_select(0, ps["probe_idx"])
        probe_now(qp, ps["starts"], m["kv_lens"], m["slot_table"], store.k[li],
                  ps["max_rows"], ps["n_track"], ps["win_off"], ps["old"], ps["old_starts"],
                  ps["acc"][li], ps["mass"][li])
        ps["last"] = li
        ps["old"] = None

    def end_pass(self) -> None:
        """Similarities and picks of the pass's layers, for all requests at once."""
        ps, self._pass = self._pass, None
        if ps is None or ps["last"] < ps["first"]:
            return
        a, b = ps["first"], ps["last"] + 1
        rows = ps["state_rows"]
        m = ps["meta"]
        if ps["any_track"]:  # mean cosine over tracked rows and keys; inf = not tested
            from vllm_elastic.kernels import drift_from_sums

            per_row = drift_from_sums(ps["acc"][a:b])  # [layers, tracked rows]
            total = torch.zeros((b - a, len(ps["n_track"])), dtype=torch.float32,
                                device=self.device).index_add_(1, ps["t_req"], per_row)
            denom = (ps["n_track"] * m["kv_lens"]).float().clamp_min(1.0)
            sim = torch.where(ps["n_track"] > 0, total / denom, float("inf"))
            self.sims[:, a:b].index_copy_(0, rows, sim.t())
        mass = ps["mass"][a:b]  # [layers, R, max_len]
        keys = torch.arange(mass.shape[2], device=self.device)
        mass.masked_fill_(keys[None, None, :] >= m["kv_lens"][None, :, None], -1.0)
        width = min(ps["is_mask"].shape[1], mass.shape[2])
        mass[:, :, :width].masked_fill_(ps["is_mask"][None, :, :width], 0.0)
        k = min(self.track_num, mass.shape[2])
        pick = mass.topk(k, dim=2).indices  # [layers, R, k]
        if k < self.track_num:
            pick = torch.cat([pick, pick[..., :1].expand(-1, -1, self.track_num - k)], 2)
        self.picks[:, a:b].index_copy_(0, rows, pick.transpose(0, 1))

    def refresh_layers(self) -> None:
        """After the row pass: every request's refresh start (one host transfer)."""
        self.end_pass()
        n, L = len(self.policies), self.num_layers
        below = self.sims[:n] < self.gamma[:n, None]
        first = torch.where(below.any(1), below.float().argmax(1) + 1,
                            torch.full((n,), L, device=self.device, dtype=torch.long))
        for p, start in zip(self.policies, first.tolist()):
            if p.params.force_refresh:
                p._batched_start = 1 if L > 1 else None
            else:
                p._batched_start = start if start < L else None

    def finish_step(self) -> None:
        """Start the picks' copy to the host; `end_step` reads it after the step's sync."""
        self.end_pass()
        n = len(self.policies)
        host = torch.empty((n, self.num_layers, self.track_num), dtype=torch.long,
                           pin_memory=self.device.type == "cuda")
        host.copy_(self.picks[:n], non_blocking=True)
        for i, p in enumerate(self.policies):
            p._batched_picks = host[i]


def _to_device(values: list, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """One host->device copy from pinned memory (never waits for the device)."""
    t = torch.tensor(values, dtype=dtype)
    if device.type == "cuda":
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)
