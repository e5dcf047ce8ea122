"""Per-request generation parameters: the decoding rule and the cache policy, validated.

Every check runs before any work, and every message names the parameter and the bound.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields, replace
from typing import Any


class InvalidRequest(ValueError):
    """A request that is refused before any work (the message says what is wrong)."""


POLICY_NAMES = ("none", "prefix", "dual", "elastic", "spa", "dkv")


@dataclass(frozen=True)
class DecodeParams:
    """LLaDA's decoding rule, shared by all cache policies.

    Candidates each step are the masked positions of the current block (`window` None) or
    the first `window` masked positions of the whole generation (Elastic-Cache's sliding
    window). Among them either the top-k of LLaDA's schedule (`steps`) or, when `steps` is
    None, the most confident one plus every other with confidence >= `threshold` commit.
    """

    gen_length: int = 256
    block_length: int = 32
    steps: int | None = None
    threshold: float = 0.9
    temperature: float = 0.0
    window: int | None = None
    logits_eos_inf: bool = False
    confidence_eos_eot_inf: bool = False
    stop_at_eos: bool = True
    seed: int = 0

    def validate(self, prompt_len: int | None = None, max_len: int | None = None) -> None:
        g, b = self.gen_length, self.block_length
        if not isinstance(g, int) or g < 1:
            raise InvalidRequest(f"gen_length must be a positive integer, got {g!r}")
        if not isinstance(b, int) or b < 1:
            raise InvalidRequest(f"block_length must be a positive integer, got {b!r}")
        if g % b:
            raise InvalidRequest(
                f"gen_length {g} is not a multiple of block_length {b}")
        if self.steps is not None:
            s = self.steps
            if not isinstance(s, int) or s < 1:
                raise InvalidRequest(f"steps must be a positive integer, got {s!r}")
            if s % (g // b):
                raise InvalidRequest(
                    f"steps {s} is not a multiple of the number of blocks {g // b} "
                    f"(gen_length {g} / block_length {b})")
            if s > g:
                raise InvalidRequest(f"steps {s} exceeds gen_length {g}")
        elif not (0.0 < self.threshold <= 1.0):
            raise InvalidRequest(f"threshold (tau) must be in (0, 1], got {self.threshold}")
        if self.temperature < 0:
            raise InvalidRequest(f"temperature must be >= 0, got {self.temperature}")
        if self.window is not None and (not isinstance(self.window, int) or self.window < 1):
            raise InvalidRequest(f"window (beta) must be an integer >= 1, got {self.window!r}")
        if prompt_len is not None and max_len is not None and prompt_len + g > max_len:
            raise InvalidRequest(
                f"prompt ({prompt_len} tokens) + gen_length ({g}) = {prompt_len + g} exceeds "
                f"the model's maximum sequence length {max_len}")
        if prompt_len is not None and prompt_len < 1:
            raise InvalidRequest("the prompt is empty")

    @property
    def steps_per_block(self) -> int | None:
        if self.steps is None:
            return None
        return self.steps // (self.gen_length // self.block_length)


@dataclass(frozen=True)
class PolicyParams:
    """Which cache policy a request uses, with that policy's knobs (published defaults)."""

    name: str = "none"
    # Elastic-Cache
    gamma: float = 0.9
    track_num: int = 1
    drift: str = "heads"  # "heads": the authors' code; "rows": the paper's row cosine
    block_caching: bool = True
    # SPA-Cache
    proxy_rank: int = 128
    spa_peak: float = 0.75
    spa_first: float = 0.03
    spa_peak_ratio: float = 0.25
    spa_last: float = 0.13
    spa_floor: float = 2 ** -4
    spa_refresh: int = 50
    spa_refresh_gen: int = 7
    # dKV-Cache-Decode
    dkv_interval: int = 8
    # Every policy: recompute everything each step (a correctness check against `none`).
    force_refresh: bool = False

    def validate(self) -> None:
        if self.name not in POLICY_NAMES:
            raise InvalidRequest(
                f"unknown cache policy {self.name!r}; choose one of {', '.join(POLICY_NAMES)}")
        if not (0.0 < self.gamma <= 1.0):
            raise InvalidRequest(f"gamma must be in (0, 1], got {self.gamma}")
        if not isinstance(self.track_num, int) or self.track_num < 1:
            raise InvalidRequest(f"track_num must be an integer >= 1, got {self.track_num!r}")
        if self.drift not in ("heads", "rows"):
            raise InvalidRequest(f"drift must be 'heads' or 'rows', got {self.drift!r}")
        if self.proxy_rank < 1:
            raise InvalidRequest(f"proxy_rank must be >= 1, got {self.proxy_rank}")
        for k in ("spa_refresh", "spa_refresh_gen", "dkv_interval"):
            if getattr(self, k) < 1:
                raise InvalidRequest(f"{k} must be >= 1, got {getattr(self, k)}")
        for k in ("spa_first", "spa_peak_ratio", "spa_last", "spa_floor"):
            if not (0.0 < getattr(self, k) <= 1.0):
                raise InvalidRequest(f"{k} must be in (0, 1], got {getattr(self, k)}")
        if not (0.0 < self.spa_peak < 1.0):
            raise InvalidRequest(f"spa_peak must be in (0, 1), got {self.spa_peak}")


DEFAULT_ELASTIC_WINDOW = 16


@dataclass(frozen=True)
class GenerationParams:
    decode: DecodeParams = field(default_factory=DecodeParams)
    policy: PolicyParams = field(default_factory=PolicyParams)

    def validate(self, prompt_len: int | None = None, max_len: int | None = None) -> None:
        self.policy.validate()
        self.decode.validate(prompt_len, max_len)
        if self.policy.name == "dual" and self.decode.window is not None:
            raise InvalidRequest(
                "policy 'dual' recomputes only the current block's rows, so it cannot decode "
                "a sliding window (window/beta) that reaches past the block; use the block "
                "rule (no window) or another policy")

    @classmethod
    def from_dict(cls, d: dict[str, Any] | None, base: "GenerationParams | None" = None
                  ) -> "GenerationParams":
        """Flat dict of overrides (`policy`, `gamma`, `window`, ...) over `base`; validated.

        The policy name goes under `policy`; `beta` is accepted for `window` and `tau` for
        `threshold`. Unknown keys are refused, not ignored.
        """
        base = base or cls()
        d = dict(d or {})
        aliases = {"beta": "window", "tau": "threshold", "cache_policy": "policy"}
        for a, k in aliases.items():
            if a in d:
                d[k] = d.pop(a)
        dec_keys = {f.name for f in fields(DecodeParams)}
        pol_keys = {f.name for f in fields(PolicyParams)} - {"name"}
        dec_over: dict[str, Any] = {}
        pol_over: dict[str, Any] = {}
        for k, v in d.items():
            if k == "policy":
                pol_over["name"] = v
            elif k in dec_keys:
                dec_over[k] = v
            elif k in pol_keys:
                pol_over[k] = v
            else:
                raise InvalidRequest(
                    f"unknown generation parameter {k!r}; known: "
                    f"{', '.join(sorted(dec_keys | pol_keys | {'policy'}))}")
        try:
            decode = replace(base.decode, **{k: _coerce(DecodeParams, k, v)
                                             for k, v in dec_over.items()})
            policy = replace(base.policy, **{k: _coerce(PolicyParams, k, v)
                                             for k, v in pol_over.items()})
        except (TypeError, ValueError) as e:
            raise InvalidRequest(str(e)) from e
        if policy.name == "elastic" and decode.window is None:
            decode = replace(decode, window=DEFAULT_ELASTIC_WINDOW)
        out = cls(decode=decode, policy=policy)
        out.validate()
        return out

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self.decode)
        out.update({k: v for k, v in asdict(self.policy).items() if k != "name"})
        out["policy"] = self.policy.name
        return out


_TYPES = {"int": int, "float": float, "bool": bool, "str": str}


def _coerce(cls: type, key: str, value: Any) -> Any:
    """Check a value against the dataclass field's annotation (JSON gives ints for floats)."""
    ann = str(next(f.type for f in fields(cls) if f.name == key))
    if value is None:
        if "None" in ann:
            return None
        raise ValueError(f"{key} must not be null")
    base = ann.split("|")[0].strip()
    if base == "bool":
        if not isinstance(value, bool):
            raise ValueError(f"{key} must be true or false, got {value!r}")
        return value
    if base == "int":
        if isinstance(value, bool) or not isinstance(value, int):
            if isinstance(value, float) and value.is_integer():
                return int(value)
            raise ValueError(f"{key} must be an integer, got {value!r}")
        return value
    if base == "float":
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ValueError(f"{key} must be a number, got {value!r}")
        return float(value)
    if base == "str":
        if not isinstance(value, str):
            raise ValueError(f"{key} must be a string, got {value!r}")
    return value
