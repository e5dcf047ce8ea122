"""Bidirectional attention of ragged query rows over each request's paged K/V.

`paged_attention` is the one entry point the step runner calls per layer. The plain torch
version below is the CPU path and the reference for the GPU kernels
(`vllm_elastic.kernels`), which are used automatically on CUDA when Triton is present.
`attention_probs` gives the attention weights of a handful of rows (Elastic-Cache's
tracked tokens and window) without touching the fast path.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass
class RaggedBatch:
    """Where each request's query rows sit in the concatenated batch, and its keys."""

    row_offsets: list[int]  # len = num_requests + 1
    slot_maps: list[torch.Tensor]  # per request: slot of every position (its keys)
    # Device copies for kernels (built on first use).
    _dev: dict | None = None

    @property
    def num_requests(self) -> int:
        return len(self.slot_maps)

    def device_meta(self, device: torch.device) -> dict:
        if self._dev is None:
            lens = [int(s.shape[0]) for s in self.slot_maps]
            max_len = max(lens)
            # One padded gather in C++ instead of a Python loop of per-request copies.
            table = torch.nn.utils.rnn.pad_sequence(
                list(self.slot_maps), batch_first=True).to(device=device, dtype=torch.int32)
            # Offsets and lengths in one host->device copy from pinned memory, so building
            # the metadata mid-step never waits for the device.
            # (kv_lens starts 16-byte aligned: Triton specialises on pointer alignment.)
            n = len(self.row_offsets)
            pad = -n % 4
            host = torch.tensor(list(self.row_offsets) + [0] * pad + lens, dtype=torch.int32)
            if device.type == "cuda":
                host = host.pin_memory()
            both = host.to(device, non_blocking=True)
            self._dev = {
                "row_offsets": both[:n],
                "kv_lens": both[n + pad:],
                "slot_table": table,
                "max_rows": max(b - a for a, b in zip(self.row_offsets, self.row_offsets[1:])),
                "max_len": max_len,
            }
        return self._dev


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """One request: q [heads, rows, dim], k/v [heads, keys, dim] -> [heads, rows, dim]."""
    return F.scaled_dot_product_attention(q, k, v, scale=1.0 / math.sqrt(q.shape[-1]))


def paged_attention_torch(q: torch.Tensor, batch: RaggedBatch, k_cache: torch.Tensor,
                          v_cache: torch.Tensor) -> torch.Tensor:
    """q: [rows, heads, dim]; k_cache/v_cache: [slots, heads, dim]. Returns [rows, heads, dim]."""
    out = torch.empty_like(q)
    for i, slots in enumerate(batch.slot_maps):
        a, b = batch.row_offsets[i], batch.row_offsets[i + 1]
        if a == b:
            continue
        k = k_cache.index_select(0, slots).transpose(0, 1)
        v = v_cache.index_select(0, slots).transpose(0, 1)
        out[a:b] = attend(q[a:b].transpose(0, 1), k, v).transpose(0, 1)
    return out


def paged_attention(q: torch.Tensor, batch: RaggedBatch, k_cache: torch.Tensor,
                    v_cache: torch.Tensor) -> torch.Tensor:
    from vllm_elastic import kernels

    if kernels.paged_attention_triton is not None and kernels.enabled(q):
        return kernels.paged_attention_triton(q, batch, k_cache, v_cache)
    return paged_attention_torch(q, batch, k_cache, v_cache)


def attention_probs(q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """Softmax attention weights of a few rows: q [n, heads, dim], k [keys, heads, dim]
    -> [heads, n, keys] in float32."""
    scale = 1.0 / math.sqrt(q.shape[-1])
    s = torch.einsum("nhd,khd->hnk", q.float(), k.float()) * scale
    return torch.softmax(s, dim=-1)
