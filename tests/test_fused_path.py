"""The fused path (padded passes, batched Elastic probes, chunked row pass) against the
per-request reference path, on the CPU (the torch versions of its kernels).

Float32 on the CPU is exact enough that the two paths must give the same tokens and the
same statistics: any difference is a bug in the plan, the padding, the batched drift test
or the orchestration of chunked row passes and refreshes.
"""

from __future__ import annotations

import pytest

from vllm_elastic.core import Engine, GenerationParams

G = 64


def _params(policy: str, **kw) -> GenerationParams:
    base = {"policy": policy, "gen_length": G, "block_length": 32, "threshold": 0.9}
    base.update(kw)
    return GenerationParams.from_dict(base)


@pytest.fixture(scope="module")
def fused_engine(model_dir):
    eng = Engine.from_pretrained(model_dir, max_batch_size=16, max_request_tokens=512)
    eng.runner.fused = True
    return eng


def _both(engine, fused_engine, prompts, params):
    ref = engine.generate(prompts, params)
    fus = fused_engine.generate(prompts, params)
    return ref, fus


@pytest.mark.parametrize("policy", ["none", "prefix", "dual", "dkv", "elastic"])
def test_fused_equals_reference(engine, fused_engine, dev_prompts, policy):
    prompts = dev_prompts[30:34]
    fused_engine.runner.start_fused_timing()
    ref, fus = _both(engine, fused_engine, prompts, _params(policy))
    timing = fused_engine.runner.fused_timing()
    assert [r.token_ids for r in fus] == [r.token_ids for r in ref]
    assert [r.stats for r in fus] == [r.stats for r in ref]
    # The time split counts every fused step and pass (device time: CUDA only).
    steps = max(r.stats["steps"] for r in fus)
    assert timing["steps"] >= steps and timing["passes"] >= timing["steps"]
    assert timing["host_s"] > 0 and timing["gpu_s"] == 0.0
    assert fused_engine.runner.fused_timing() == {}  # reporting stopped it


def test_fused_mixed_batch_and_fallback(engine, fused_engine, dev_prompts):
    """Every policy in one batch: SPA and the 'rows' drift take the reference path in the
    same step, the rest the fused path; sampling decodes outside the pass."""
    prompts = [dev_prompts[i] for i in (40, 41, 42, 43, 44, 45, 46, 47)]
    params = [_params("none"), _params("elastic", gamma=0.95), _params("dual", steps=32),
              _params("prefix", threshold=0.8, gen_length=32), _params("spa", gen_length=96),
              _params("dkv", block_length=16), _params("elastic", window=8, drift="rows"),
              _params("elastic", temperature=0.7, seed=3)]
    ref, fus = _both(engine, fused_engine, prompts, params)
    assert [r.token_ids for r in fus] == [r.token_ids for r in ref]
    counts = fused_engine.runner.pass_counts()
    assert counts["eager"] > 0  # the fused path ran


def test_chunked_row_pass_equals_unchunked(fused_engine, dev_prompts):
    """Refreshes forced at changing layers (some below the chunk layer, some at it, some
    above: a second refresh round) give the tokens of the unchunked row pass, which are
    the reference path's."""
    prompts = dev_prompts[60:66]
    L = fused_engine.model.cfg.n_layers

    def forced(r, start):
        k = (r.step_index * 7 + len(r.id)) % (L + 2)
        return None if k >= L else k

    params = _params("elastic", gamma=0.5)  # drift alone rarely refreshes here
    runs = {}
    for chunking in (True, False):
        fused_engine.runner.refresh_override = forced
        fused_engine.runner.chunking = chunking
        runs[chunking] = fused_engine.generate(prompts, params)
    fused_engine.runner.refresh_override = None
    fused_engine.runner.chunking = True
    assert [r.token_ids for r in runs[True]] == [r.token_ids for r in runs[False]]
    assert [r.stats for r in runs[True]] == [r.stats for r in runs[False]]
    assert any(r.stats["drift_events"] > 3 for r in runs[True])


def test_override_same_on_both_paths(engine, fused_engine, dev_prompts):
    prompts = dev_prompts[70:73]

    def forced(r, start):
        return 2 + r.step_index % 5 if r.step_index % 3 else None

    params = _params("elastic")
    for e in (engine, fused_engine):
        e.runner.refresh_override = forced
    try:
        ref, fus = _both(engine, fused_engine, prompts, params)
    finally:
        for e in (engine, fused_engine):
            e.runner.refresh_override = None
    assert [r.token_ids for r in fus] == [r.token_ids for r in ref]
    assert [r.stats for r in fus] == [r.stats for r in ref]


def test_fused_forced_refresh_equals_full_recompute(fused_engine, dev_prompts):
    prompts = dev_prompts[80:83]
    full = fused_engine.generate(prompts, _params("none", window=16, stop_at_eos=False))
    forced = fused_engine.generate(prompts, _params("elastic", force_refresh=True,
                                                    stop_at_eos=False))
    assert [r.token_ids for r in forced] == [r.token_ids for r in full]
