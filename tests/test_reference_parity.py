"""Policy `none` reproduces LLaDA's reference decoding token for token."""

from __future__ import annotations

import pytest

from vllm_elastic.core import GenerationParams

from .reference_llada import ReferenceLLaDA, generate

N_PROMPTS = 50
G, B = 64, 32


@pytest.fixture(scope="module")
def reference(model_dir):
    return ReferenceLLaDA(model_dir)


@pytest.mark.parametrize("mode", [{"steps": 32}, {"threshold": 0.9}], ids=["topk", "threshold"])
def test_none_matches_reference_generate(engine, reference, dev_prompts, mode):
    prompts = dev_prompts[:N_PROMPTS]
    params = GenerationParams.from_dict(
        {"policy": "none", "gen_length": G, "block_length": B, "stop_at_eos": False, **mode})
    ours = engine.generate(prompts, params)
    stop = set(engine.special.stop)
    mismatches = []
    for i, (p, res) in enumerate(zip(prompts, ours)):
        ref = generate(reference.logits, p, reference.mask_id, G, B,
                       steps=mode.get("steps"), threshold=mode.get("threshold"))
        # Our output stops at the first EOS / end of turn; compare up to there.
        n = next((j + 1 for j, t in enumerate(ref) if t in stop), len(ref))
        if res.token_ids != ref[:n]:
            mismatches.append(i)
    assert not mismatches, f"{len(mismatches)} of {len(prompts)} differ: {mismatches}"
