"""Bad input is refused before any work, with a message naming the problem."""

from __future__ import annotations

import pytest

from vllm_elastic.core import GenerationParams, InvalidRequest


@pytest.mark.parametrize("overrides, message", [
    ({"gen_length": 100, "block_length": 32}, "gen_length 100 is not a multiple of block_length 32"),
    ({"policy": "fancy"}, "unknown cache policy 'fancy'"),
    ({"gamma": 0.0}, "gamma must be in (0, 1]"),
    ({"gamma": 1.5}, "gamma must be in (0, 1]"),
    ({"window": 0}, "window (beta) must be an integer >= 1"),
    ({"beta": -2}, "window (beta) must be an integer >= 1"),
    ({"threshold": 0.0}, "threshold (tau) must be in (0, 1]"),
    ({"tau": 1.2}, "threshold (tau) must be in (0, 1]"),
    ({"steps": 7, "gen_length": 64, "block_length": 32}, "steps 7 is not a multiple"),
    ({"temperature": -1}, "temperature must be >= 0"),
    ({"track_num": 0}, "track_num must be an integer >= 1"),
    ({"drift": "cols"}, "drift must be 'heads' or 'rows'"),
    ({"gamma": "high"}, "gamma must be a number"),
    ({"bogus": 1}, "unknown generation parameter 'bogus'"),
    ({"policy": "dual", "window": 16}, "cannot decode a sliding window"),
])
def test_bad_params_are_refused(overrides, message):
    with pytest.raises(InvalidRequest) as e:
        GenerationParams.from_dict(overrides)
    assert message in str(e.value)


def test_prompt_over_maximum_is_refused(engine):
    params = GenerationParams.from_dict({"gen_length": 256})
    too_long = [5] * (engine.model.cfg.max_sequence_length - 100)
    with pytest.raises(InvalidRequest, match="exceeds the model's maximum sequence length 4096"):
        engine.add_request(too_long, params)
    assert not engine.has_unfinished()


def test_bad_token_ids_are_refused(engine):
    with pytest.raises(InvalidRequest, match="prompt token ids must be integers"):
        engine.add_request([1, 2, 10 ** 6], GenerationParams())


def test_elastic_gets_its_window_by_default():
    p = GenerationParams.from_dict({"policy": "elastic"})
    assert p.decode.window == 16 and p.policy.gamma == 0.9 and p.decode.threshold == 0.9
    assert GenerationParams.from_dict({"policy": "dual"}).decode.window is None
