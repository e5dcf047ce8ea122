"""Cache policies: one small class each, behind `CachePolicy`."""

from __future__ import annotations

from typing import TYPE_CHECKING

from .base import CachePolicy, LayerView
from .dkv import DelayedKVCache
from .elastic import ElasticCache
from .fast_dllm import DualCache, PrefixCache
from .full import FullRecompute
from .spa import SpaCache

if TYPE_CHECKING:
    from ..params import PolicyParams
    from ..request import Request

POLICIES: dict[str, type[CachePolicy]] = {
    cls.name: cls
    for cls in (FullRecompute, PrefixCache, DualCache, ElasticCache, SpaCache, DelayedKVCache)
}


def make_policy(params: "PolicyParams", request: "Request") -> CachePolicy:
    return POLICIES[params.name](params, request)


__all__ = ["POLICIES", "CachePolicy", "LayerView", "make_policy"]
