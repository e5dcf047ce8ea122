"""A paged, layered KV store.

Positions live in fixed-size pages; a request owns a page table (its pages, in position
order). Every page holds, for every layer, that layer's K and V at its positions and,
where a policy keeps them, the layer's input hidden states ("x"). Refreshing layer l of a
request rewrites layer l's slice of its pages and leaves the other layers alone.

The pool's tensors are flat over slots (`slot = page * page_size + offset`), one tensor per
layer and channel, so a request's rows are addressed by a slot map computed once.
Under vLLM the pages are the blocks of vLLM's KV cache manager; on its own the store's
`PageAllocator` hands them out.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


class KVPoolExhausted(RuntimeError):
    """Not enough free pages for a request: retry later with fewer requests in flight."""


class PageAllocator:
    """A free list of page ids with per-owner accounting (no page is lost or shared)."""

    def __init__(self, num_pages: int):
        self.num_pages = num_pages
        self._free = list(range(num_pages - 1, -1, -1))
        self._owned: dict[str, list[int]] = {}

    @property
    def num_free(self) -> int:
        return len(self._free)

    def owners(self) -> list[str]:
        return list(self._owned)

    def allocate(self, owner: str, n: int) -> list[int]:
        if owner in self._owned:
            raise ValueError(f"request {owner!r} already holds pages")
        if n > self.num_free:
            raise KVPoolExhausted(
                f"KV pool exhausted: request {owner!r} needs {n} pages, {self.num_free} of "
                f"{self.num_pages} are free; lower the batch size or enlarge the pool"
            )
        pages = [self._free.pop() for _ in range(n)]
        self._owned[owner] = pages
        return pages

    def free(self, owner: str) -> None:
        pages = self._owned.pop(owner, None)
        if pages:
            self._free.extend(reversed(pages))


@dataclass
class StoreLayout:
    num_layers: int
    num_pages: int
    page_size: int
    num_heads: int  # this rank's heads
    head_dim: int
    hidden_size: int
    keep_layer_inputs: bool  # per-layer input hidden states (Elastic-Cache, SPA)
    dtype: torch.dtype
    device: torch.device

    def bytes_per_page(self) -> int:
        el = torch.tensor([], dtype=self.dtype).element_size()
        per_slot = 2 * self.num_heads * self.head_dim * self.num_layers
        if self.keep_layer_inputs:
            per_slot += self.hidden_size * (self.num_layers + 1)
        return per_slot * self.page_size * el


class PagedKVStore:
    """Per-layer K/V (and layer inputs) for all requests, in one pool of pages."""

    def __init__(self, layout: StoreLayout, allocator: PageAllocator | None = None):
        self.layout = layout
        self.k, self.v, self.x = self.allocate_tensors(layout)
        self.allocator = allocator if allocator is not None else PageAllocator(layout.num_pages)

    @staticmethod
    def allocate_tensors(layout: StoreLayout
                         ) -> tuple[list[torch.Tensor], list[torch.Tensor],
                                    list[torch.Tensor] | None]:
        """Zeroed K, V (one per layer) and layer inputs (x[l] = input of layer l;
        x[num_layers] = the final hidden state before ln_f; None if not kept)."""
        n_slots = layout.num_pages * layout.page_size
        kv_shape = (n_slots, layout.num_heads, layout.head_dim)
        mk = dict(dtype=layout.dtype, device=layout.device)
        k = [torch.zeros(kv_shape, **mk) for _ in range(layout.num_layers)]
        v = [torch.zeros(kv_shape, **mk) for _ in range(layout.num_layers)]
        x = ([torch.zeros(n_slots, layout.hidden_size, **mk)
              for _ in range(layout.num_layers + 1)] if layout.keep_layer_inputs else None)
        return k, v, x

    @classmethod
    def from_tensors(cls, layout: StoreLayout, k: list[torch.Tensor], v: list[torch.Tensor],
                     x: list[torch.Tensor] | None) -> "PagedKVStore":
        """Wrap tensors allocated elsewhere (vLLM's KV cache); pages are handed out there."""
        self = cls.__new__(cls)
        self.layout, self.k, self.v, self.x, self.allocator = layout, k, v, x, None
        return self

    @property
    def page_size(self) -> int:
        return self.layout.page_size

    def pages_for(self, num_positions: int) -> int:
        return -(-num_positions // self.page_size)

    def slot_map(self, pages: list[int], num_positions: int) -> torch.Tensor:
        """Slot of each position 0..num_positions-1 of a request with these pages."""
        if len(pages) * self.page_size < num_positions:
            raise ValueError(f"{len(pages)} pages cannot hold {num_positions} positions")
        p = torch.tensor(pages, dtype=torch.long, device=self.layout.device)
        offs = torch.arange(self.page_size, device=self.layout.device)
        return (p[:, None] * self.page_size + offs[None, :]).reshape(-1)[:num_positions]

    def allocate(self, owner: str, num_positions: int) -> list[int]:
        if self.allocator is None:
            raise RuntimeError("this store's pages are managed outside it")
        return self.allocator.allocate(owner, self.pages_for(num_positions))

    def free(self, owner: str) -> None:
        if self.allocator is not None:
            self.allocator.free(owner)

    # -- layer access ----------------------------------------------------------------------

    def write_kv(self, layer: int, slots: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        self.k[layer].index_copy_(0, slots, k)
        self.v[layer].index_copy_(0, slots, v)

    def write_x(self, layer: int, slots: torch.Tensor, h: torch.Tensor) -> None:
        if self.x is not None:
            self.x[layer].index_copy_(0, slots, h)

    def read_x(self, layer: int, slots: torch.Tensor) -> torch.Tensor:
        assert self.x is not None, "layer inputs are not kept by this store"
        return self.x[layer].index_select(0, slots)
