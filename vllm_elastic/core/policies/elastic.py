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

The hooks below are the per-request reference; on CUDA the step runner's fused pass
(`core.fused.layers`) computes the same drift test and picks for every request of a batch at
once (drift "heads") and hands the result back through `set_track`.
"""

from __future__ import annotations

import numpy as np
import torch

from ..attention import attention_probs
from .base import CachePolicy, LayerView


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
        self.n_track = 0  # this step's tracked rows (the first rows)
        self.window: list[int] = []  # this step's window positions
        self._is_mask: torch.Tensor | None = None
        self._window_pos: torch.Tensor | None = None
        self.last_refresh: int | None = None  # the last step's refresh start (fused path)

    # -- plan --------------------------------------------------------------------------------

    def rows(self, full: bool = False) -> list[int] | None:
        r = self.request
        self._picks, self._sims = [], []
        self._is_mask = self._window_pos = None
        window = r.masked[:r.params.decode.window] if self.params.block_caching else r.masked
        self.window = window
        if r.step_index == 0 or full:
            self.n_track = 0
            return None
        seen = set()
        out = []
        for group in (self.track, r.new_positions, window):
            for p in group:
                if p not in seen:
                    seen.add(p)
                    out.append(p)
        self.n_track = len(self.track)  # tracked rows come first
        return out

    def _device_state(self) -> None:
        if self._is_mask is None:
            r = self.request
            self._is_mask = r.canvas == r.special.mask
            self._window_pos = torch.tensor(self.window, dtype=torch.long, device=r.device)

    # -- per layer ---------------------------------------------------------------------------

    def _tp(self, view: LayerView):
        return view.layer.tp

    def before_kv_write(self, view: LayerView) -> None:
        self._old = None
        self._device_state()
        if view.refreshing or self.n_track == 0:
            return
        r = self.request
        slots = r.slot_map
        pos = view.positions[:self.n_track]
        x_old = view.store.read_x(view.index, slots.index_select(0, pos))
        q_old = view.layer.query(x_old, pos, view.rope)
        k_old = view.store.k[view.index].index_select(0, slots)
        self._old = attention_probs(q_old, k_old)  # [heads, tracked, keys]

    def after_attention(self, view: LayerView) -> None:
        r = self.request
        self._device_state()
        k_now = view.store.k[view.index].index_select(0, r.slot_map)
        tp = self._tp(view)
        if view.refreshing:
            win_q = view.q.index_select(0, self._window_pos)
        else:
            win_q = view.q[view.q.shape[0] - len(self.window):]
            if self._old is not None:
                now = attention_probs(view.q[:self.n_track], k_now)
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

    def set_track(self, picks: np.ndarray) -> None:
        """Next step's tracked tokens from this step's picks [layers, >= track_num] (the
        fused pass's result; the hooks above collect their own)."""
        self.track = sorted(set(picks[:, :self.params.track_num].astype(np.int64)
                                .flatten().tolist()))

    def end_step(self) -> None:
        if self._picks:
            self.track = sorted(set(torch.cat(self._picks).tolist()))
        self._picks = []
