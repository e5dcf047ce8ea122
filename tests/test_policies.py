"""Every cache policy against full recompute, and batch invariance."""

from __future__ import annotations

import pytest

from vllm_elastic.core import GenerationParams
from vllm_elastic.core.policies.spa import update_ratios

G, B = 64, 32
POLICIES = ["prefix", "dual", "elastic", "spa", "dkv"]


def _params(policy: str, **kw) -> GenerationParams:
    base = {"policy": policy, "gen_length": G, "block_length": B, "stop_at_eos": False}
    base.update(kw)
    return GenerationParams.from_dict(base)


MODES = {"threshold": {"threshold": 0.9}, "topk": {"steps": 32}}


@pytest.fixture(scope="module")
def full_recompute(engine, dev_prompts):
    """`none`'s tokens per (mode, decoding rule), computed once."""
    prompts = dev_prompts[50:58]
    out = {}
    for mode, kw in MODES.items():
        for rule, extra in (("block", {}), ("window", {"window": 16})):
            res = engine.generate(prompts, _params("none", **extra, **kw))
            out[mode, rule] = [r.token_ids for r in res]
    return prompts, out


@pytest.mark.parametrize("mode", list(MODES))
@pytest.mark.parametrize("policy", POLICIES)
def test_forced_refresh_equals_full_recompute(engine, full_recompute, policy, mode):
    """With its refresh forced every step a policy must give full recompute's tokens.

    For Elastic-Cache the forced refresh goes through the cache: after the row pass every
    row is recomputed starting from the cached layer inputs (from layer 0, whose cached
    inputs are exact for every row).
    """
    prompts, full = full_recompute
    forced = engine.generate(prompts, _params(policy, force_refresh=True, **MODES[mode]))
    rule = "window" if policy == "elastic" else "block"
    assert [r.token_ids for r in forced] == full[mode, rule]
    if policy == "elastic":
        assert all(r.stats["drift_events"] == r.stats["steps"] - 1 for r in forced)


def test_policies_save_compute(engine, dev_prompts):
    prompts = dev_prompts[:4]
    for policy in POLICIES:
        res = engine.generate(prompts, _params(policy, threshold=0.9))
        frac = sum(r.stats["compute_fraction"] for r in res) / len(res)
        assert frac < 1.0, (policy, frac)


def test_elastic_gamma_controls_refresh(engine, dev_prompts):
    prompts = dev_prompts[:4]
    fractions = []
    for gamma in (0.5, 0.9, 1.0):
        res = engine.generate(prompts, _params("elastic", gamma=gamma))
        fractions.append(sum(r.stats["layer_refresh_fraction"] for r in res) / len(res))
    assert fractions[0] <= fractions[1] <= fractions[2], fractions
    assert fractions[0] < fractions[2]


def test_batch_invariance(engine, dev_prompts):
    """Each request's tokens are the same alone and inside a mixed batch of 8."""
    prompts = [dev_prompts[i] for i in (0, 1, 2, 3, 7, 11, 13, 17)]
    params = [
        _params("none", threshold=0.9),
        _params("elastic", threshold=0.9, gamma=0.95),
        _params("dual", steps=32),
        _params("prefix", threshold=0.8, gen_length=32),
        _params("spa", threshold=0.9, gen_length=96),
        _params("dkv", threshold=0.9, block_length=16),
        _params("elastic", threshold=0.7, window=8, drift="rows"),
        _params("none", temperature=0.7, seed=3, threshold=0.9),
    ]
    assert len({len(p) for p in prompts}) > 4
    alone = [engine.generate([p], [gp])[0].token_ids for p, gp in zip(prompts, params)]
    together = [r.token_ids for r in engine.generate(prompts, params)]
    assert together == alone


def test_refreshes_joining_at_one_layer(engine, dev_prompts):
    """Refresh passes that start at different layers, two of them at the same layer while
    another is already running, give each request its tokens alone."""
    prompts = dev_prompts[20:23]
    params = [_params("elastic", force_refresh=True),  # refresh from layer 0
              _params("elastic", gamma=1.0),  # drift "fails" at layer 0: refresh from 1
              _params("elastic", gamma=1.0, drift="rows")]
    alone = [engine.generate([p], [gp])[0].token_ids for p, gp in zip(prompts, params)]
    assert [r.token_ids for r in engine.generate(prompts, params)] == alone


def test_early_stop_at_end_of_turn(engine, dev_prompts):
    res = engine.generate(dev_prompts[:4], _params("elastic", stop_at_eos=True,
                                                   gen_length=192))
    stop = set(engine.special.stop)
    for r in res:
        if r.finish_reason == "stop":
            assert r.token_ids[-1] in stop and not (set(r.token_ids[:-1]) & stop)
        else:
            assert r.finish_reason == "length" and len(r.token_ids) == 192
            assert not set(r.token_ids) & stop
    assert any(r.finish_reason == "stop" for r in res)


def test_spa_ratio_schedule_matches_published_shape():
    rho = update_ratios(32, 0.75, 0.03, 0.25, 0.13, 2 ** -4)
    assert rho[0] == 2 ** -4  # floored left of the peak
    assert max(rho) == pytest.approx(0.25, abs=2e-3) and rho.index(max(rho)) == 24
    assert rho[-1] < rho[24] and rho[-1] > 0.13
    assert 0.15 < sum(rho) / len(rho) < 0.17  # the scripts' mean, 0.162
