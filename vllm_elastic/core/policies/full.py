"""`none`: full recompute every step (vanilla LLaDA decoding)."""

from __future__ import annotations

from .base import CachePolicy


class FullRecompute(CachePolicy):
    name = "none"

    def rows(self, full: bool = False) -> list[int] | None:
        return None
