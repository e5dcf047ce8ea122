"""dKV-Cache-Decode: delayed caching.

Each step recomputes the positions that were masked at the previous step (every still
masked position plus the tokens committed last step); a committed token's K/V freezes one
step after its commit. The cache is rebuilt at each block start (two full passes) and by a
full pass every `dkv_interval` steps inside a block.
"""

from __future__ import annotations

from .base import CachePolicy


class DelayedKVCache(CachePolicy):
    name = "dkv"

    def rows(self, full: bool = False) -> list[int] | None:
        r = self.request
        i = r.block_step
        if full or i <= 1 or i % self.params.dkv_interval == 0 or self.params.force_refresh:
            return None
        return sorted(set(r.masked) | set(r.new_positions))
