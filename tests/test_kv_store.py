"""The paged store returns every page, and a full pool gives a clear error."""

from __future__ import annotations

import pytest
import torch

from vllm_elastic.core import (Engine, GenerationParams, InvalidRequest, KVPoolExhausted,
                               PageAllocator, PagedKVStore, StoreLayout)


def _params(**kw):
    return GenerationParams.from_dict({"policy": "elastic", "gen_length": 32,
                                       "block_length": 32, **kw})


def test_allocator_accounting():
    a = PageAllocator(8)
    x = a.allocate("x", 3)
    y = a.allocate("y", 5)
    assert sorted(x + y) == list(range(8)) and a.num_free == 0
    with pytest.raises(KVPoolExhausted, match="needs 1 pages, 0 of 8 are free"):
        a.allocate("z", 1)
    a.free("x")
    a.free("x")  # idempotent
    assert a.num_free == 3 and a.owners() == ["y"]


def test_slot_map_and_layer_isolation():
    layout = StoreLayout(num_layers=2, num_pages=4, page_size=4, num_heads=2, head_dim=8,
                         hidden_size=16, keep_layer_inputs=True, dtype=torch.float32,
                         device=torch.device("cpu"))
    store = PagedKVStore(layout)
    pages = store.allocate("r", 10)
    slots = store.slot_map(pages, 10)
    assert len(pages) == 3 and slots.shape == (10,)
    assert slots.tolist() == [p * 4 + o for p in pages for o in range(4)][:10]
    k = torch.randn(10, 2, 8)
    store.write_kv(1, slots, k, k)
    assert torch.equal(store.k[1][slots], k) and store.k[0].abs().sum() == 0


def test_pages_returned_on_finish_and_abort(engine, dev_prompts):
    free0 = engine.store.allocator.num_free
    engine.generate(dev_prompts[:5], _params())
    assert engine.store.allocator.num_free == free0 and not engine.store.allocator.owners()
    r1 = engine.add_request(dev_prompts[0], _params())
    r2 = engine.add_request(dev_prompts[1], _params())
    engine.step()
    assert engine.store.allocator.num_free < free0
    engine.abort(r1.id)
    engine.abort(r2.id)
    assert engine.store.allocator.num_free == free0 and not engine.has_unfinished()


def test_small_pool_queues_requests_and_all_finish(model_dir, dev_prompts):
    # Room for two requests at a time: the rest wait for pages and none is lost.
    small = Engine.from_pretrained(model_dir, max_batch_size=8, page_size=16, num_pages=14)
    big = Engine.from_pretrained(model_dir, max_batch_size=8)
    prompts = dev_prompts[:6]
    assert [r.token_ids for r in small.generate(prompts, _params())] == \
           [r.token_ids for r in big.generate(prompts, _params())]
    assert small.store.allocator.num_free == 14


def test_request_larger_than_pool_is_refused(model_dir, dev_prompts):
    tiny = Engine.from_pretrained(model_dir, max_batch_size=2, page_size=16, num_pages=3)
    with pytest.raises(InvalidRequest, match="needs .* KV pages but the pool has only 3"):
        tiny.add_request(dev_prompts[0], _params())


def test_pool_exhausted_error_is_clear(model_dir, dev_prompts):
    eng = Engine.from_pretrained(model_dir, max_batch_size=4, page_size=16, num_pages=8)
    eng.store.allocator.allocate("someone-else", 6)  # pages held outside this engine
    eng.add_request(dev_prompts[0], _params())
    with pytest.raises(KVPoolExhausted, match="KV pool exhausted"):
        eng.step()
