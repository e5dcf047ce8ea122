"""The engine core: paged layered KV store, cache policies, step runner. No vLLM import."""

from .engine import Engine, GenerationResult
from .kv_store import KVPoolExhausted, PagedKVStore, PageAllocator, StoreLayout
from .params import DecodeParams, GenerationParams, InvalidRequest, PolicyParams
from .request import Request, StepOutput
from .step_runner import StepRunner

__all__ = ["DecodeParams", "Engine", "GenerationParams", "GenerationResult", "InvalidRequest",
           "KVPoolExhausted", "PageAllocator", "PagedKVStore", "PolicyParams", "Request",
           "StepOutput", "StepRunner", "StoreLayout"]
