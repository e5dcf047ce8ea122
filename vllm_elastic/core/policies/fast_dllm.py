"""Fast-dLLM's prefix and dual caches: refreshed by a full pass at every block start.

Prefix: inside a block, the block and every later position are recomputed; the prefix's
K/V are reused. Dual: only the block's rows are recomputed and their K/V overwritten in
place; the prefix's and the suffix's K/V are reused.
"""

from __future__ import annotations

from .base import CachePolicy


class PrefixCache(CachePolicy):
    name = "prefix"

    def rows(self, full: bool = False) -> list[int] | None:
        r = self.request
        if full or r.block_step == 0 or self.params.force_refresh:
            return None
        lo, _ = r.block_bounds()
        return list(range(lo, r.total_len))


class DualCache(CachePolicy):
    name = "dual"

    def rows(self, full: bool = False) -> list[int] | None:
        r = self.request
        if full or r.block_step == 0 or self.params.force_refresh:
            return None
        lo, hi = r.block_bounds()
        return list(range(lo, hi))
