"""The one question every cache policy answers: which rows does each layer recompute?

A policy object lives with one request. Each step the runner asks `rows()` for the
positions whose hidden states flow through the layers this step (None: every position,
a full pass). Rows are recomputed at every layer: their K/V (and, where the policy keeps
them, their layer inputs) are written into the request's pages; every other position's
K/V is reused from the pages. A policy that decides during the forward (Elastic-Cache)
also gets per-layer hooks and may ask for a refresh: every row of the sequence recomputed
from some layer on, starting from that layer's cached inputs.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar

import torch

if TYPE_CHECKING:
    from model_executor.llada import LLaDALayer

    from ..kv_store import PagedKVStore
    from ..params import PolicyParams
    from ..request import Request


@dataclass
class LayerView:
    """What a policy's hook sees of one layer for its request."""

    index: int
    layer: "LLaDALayer"
    store: "PagedKVStore"
    positions: torch.Tensor  # the request's rows this layer (absolute positions)
    q: torch.Tensor  # their post-RoPE queries [rows, heads_local, head_dim]
    h: torch.Tensor  # their layer inputs [rows, d_model]
    refreshing: bool  # True: every position of the request is a row (a refresh/full pass)
    rope: object
    subset: torch.Tensor | None = None


class CachePolicy:
    name: ClassVar[str] = ""
    keeps_layer_inputs: ClassVar[bool] = False  # the runner writes each row's layer input
    needs_layer_state: ClassVar[bool] = False  # the store's per-layer hidden-size channel
    has_layer_hooks: ClassVar[bool] = False
    selects_queries: ClassVar[bool] = False  # attention/MLP for a subset of the rows

    def __init__(self, params: "PolicyParams", request: "Request"):
        self.params = params
        self.request = request

    def rows(self, full: bool = False) -> list[int] | None:
        """Positions recomputed this step (any order, no duplicates); None = all.
        `full` asks for a full pass (after a preemption lost the request's pages)."""
        raise NotImplementedError

    # Hooks, called only when `has_layer_hooks`.
    def before_kv_write(self, view: LayerView) -> None:
        """The layer's K/V pages still hold the previous values of this step's rows."""

    def after_attention(self, view: LayerView) -> None:
        """The layer's pages hold this step's K/V; `view.q` has attended to them."""

    def query_subset(self, view: LayerView) -> torch.Tensor | None:
        """Indices (into the rows) that get attention and MLP at this layer; None = all.
        The other rows' K/V are still recomputed and written."""
        return None

    def merge_subset(self, view: LayerView, subset: torch.Tensor, out: torch.Tensor
                     ) -> torch.Tensor:
        """Layer output of every row, given the subset's fresh outputs."""
        raise NotImplementedError

    def rows_computed(self, num_rows: int, num_layers: int) -> int:
        """Rows x layers this step computed (attention + MLP) for the stats."""
        return num_rows * num_layers

    def refresh_layer(self, num_layers: int) -> int | None:
        """After the row pass: recompute every row from this layer on (None: no refresh)."""
        return None

    def end_step(self) -> None:
        """After the step's commits (the request's masked set is up to date)."""
