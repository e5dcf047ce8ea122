"""SPA-Cache: a singular-vector proxy picks which generation rows each layer updates.

Per layer, the proxy of a row is the top-r singular coordinates of v_proj applied to the
row's normed input (`S_r V_r^T norm(h)`): what the layer's values would see, at a fraction
of the cost. On an update step, layer 0 recomputes every generation row; each deeper
layer recomputes K/V for every generation row but attention and MLP only for the
`rho(l) * G` rows whose proxy moved most since the previous step (lowest cosine). The
other rows' outputs are their input plus the residual change cached when they were last
computed. rho follows a split Gaussian over depth. Every `spa_refresh` steps a full pass
(prompt included) rebuilds everything; every `spa_refresh_gen` steps all generation rows
are recomputed at every layer. The prompt's K/V at layers >= 1 are reused between full
passes (at layer 0 its inputs, the embeddings, never change).

Under tensor parallelism the proxy weights come from the all-gathered v_proj and the
proxies from the replicated hidden states, so every rank selects the same rows.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from model_executor.layers import linear, rms_norm

from .base import CachePolicy, LayerView


def update_ratios(num_layers: int, peak: float, first: float, peak_ratio: float, last: float,
                  floor: float) -> list[float]:
    """rho(l) for l = 0..L-1: a split Gaussian over depth t = l / L, floored left of the peak."""
    sigma_left = math.sqrt(-peak ** 2 / (2 * math.log(first / peak_ratio)))
    sigma_right = math.sqrt(-(1 - peak) ** 2 / (2 * math.log(last / peak_ratio)))
    out = []
    for l in range(num_layers):
        t = l / num_layers
        sigma = sigma_left if t < peak else sigma_right
        rho = peak_ratio * math.exp(-(t - peak) ** 2 / (2 * sigma ** 2))
        if t < peak:
            rho = max(rho, floor)
        out.append(rho)
    return out


def proxy_weights(layer, rank: int) -> torch.Tensor:
    """[rank, d_model]: S_r V_r^T of the layer's full v_proj (cached on the layer)."""
    cache = layer.__dict__.setdefault("_spa_proxy", {})
    if rank not in cache:
        w_t = layer.w_v.float().t().contiguous()  # [d_model, d_v_local]
        w_t = layer.tp.all_gather_last(w_t).double()  # [d_model, d_v]
        # In float64, so that every process (any thread count) rounds to the same weights:
        # the row selection flips on last-bit differences of the proxies.
        u, s, _ = torch.linalg.svd(w_t, full_matrices=False)
        r = min(rank, s.shape[0])
        cache[rank] = (u[:, :r] * s[None, :r]).t().contiguous().to(layer.w_v.dtype)
    return cache[rank]


class SpaCache(CachePolicy):
    name = "spa"
    has_layer_hooks = True
    selects_queries = True
    needs_layer_state = True

    def __init__(self, params, request):
        super().__init__(params, request)
        self.mode = "full"
        self._prev: list[torch.Tensor | None] = []
        self._counts: list[int] | None = None
        self._computed = 0
        self._gen_slots: torch.Tensor | None = None

    def rows(self, full: bool = False) -> list[int] | None:
        r, p = self.request, self.params
        self._computed = 0
        if self._gen_slots is None or full:  # full: new pages after a preemption
            self._gen_slots = r.slot_map[r.prompt_len:]
        if full or r.step_index % p.spa_refresh == 0 or p.force_refresh:
            self.mode = "full"
            return None
        self.mode = "gen" if r.step_index % p.spa_refresh_gen == 0 else "select"
        return list(range(r.prompt_len, r.total_len))

    def _layer_counts(self, num_layers: int) -> list[int]:
        if self._counts is None:
            p = self.params
            g = self.request.params.decode.gen_length
            rho = update_ratios(num_layers, p.spa_peak, p.spa_first, p.spa_peak_ratio,
                                p.spa_last, p.spa_floor)
            self._counts = [max(1, min(g, int(g * x))) for x in rho]
        return self._counts

    def query_subset(self, view: LayerView) -> torch.Tensor | None:
        r, l = self.request, view.index
        num_layers = len(view.store.k)
        off = r.prompt_len if view.refreshing else 0
        h_gen = view.h[off:]
        w = proxy_weights(view.layer, self.params.proxy_rank)
        x = rms_norm(h_gen, view.layer.attn_norm, view.layer.cfg.rms_norm_eps)
        proxy = linear(x, w).float()
        while len(self._prev) < num_layers:
            self._prev.append(None)
        prev = self._prev[l]
        self._prev[l] = proxy
        n = view.h.shape[0]
        if self.mode == "select" and l >= 1 and prev is not None:
            k = self._layer_counts(num_layers)[l]
            cos = F.cosine_similarity(proxy, prev, dim=-1)
            sel = cos.topk(k, largest=False).indices.sort().values
            self._computed += k
            return sel
        self._computed += n
        return torch.arange(n, device=view.h.device)

    def merge_subset(self, view: LayerView, subset: torch.Tensor, out: torch.Tensor
                     ) -> torch.Tensor:
        r, l = self.request, view.index
        off = r.prompt_len if view.refreshing else 0
        h = view.h
        delta = view.store.x[l]
        if off:  # full pass: rows are every position; cache the generation rows' changes
            delta.index_copy_(0, self._gen_slots, out[off:] - h[off:])
            return out
        delta.index_copy_(0, self._gen_slots.index_select(0, subset),
                          out - h.index_select(0, subset))
        result = h + delta.index_select(0, self._gen_slots)
        result.index_copy_(0, subset, out)
        return result

    def rows_computed(self, num_rows: int, num_layers: int) -> int:
        return self._computed
