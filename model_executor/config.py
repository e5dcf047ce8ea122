"""LLaDA checkpoint configuration: the fields of a published `config.json`, checked.

A loader that silently accepts a config it does not understand computes the wrong
function, so every field that changes the computation is either honoured or refused.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Any


class CheckpointError(ValueError):
    """A checkpoint folder that cannot be loaded as it is (missing files, unknown config)."""


@dataclass(frozen=True)
class LLaDAConfig:
    d_model: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    mlp_hidden_size: int
    vocab_size: int
    embedding_size: int
    max_sequence_length: int
    rope_theta: float
    rms_norm_eps: float
    mask_token_id: int
    eos_token_id: int
    bos_token_id: int | None
    pad_token_id: int | None
    scale_logits: bool = False
    weight_tying: bool = False

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads

    @classmethod
    def from_dict(cls, raw: dict[str, Any], where: str = "config.json") -> "LLaDAConfig":
        def need(key: str) -> Any:
            if key not in raw or raw[key] is None:
                raise CheckpointError(f"{where}: required field '{key}' is missing")
            return raw[key]

        model_type = raw.get("model_type")
        if model_type != "llada":
            raise CheckpointError(
                f"{where}: model_type is {model_type!r}; this loader knows only 'llada'"
            )
        # Fields that change the computation: each must have the value this model implements.
        expected = {
            "block_type": "llama",
            "layer_norm_type": "rms",
            "activation_type": "silu",
            "rope": True,
            "alibi": False,
            "include_bias": False,
            "multi_query_attention": None,
            "attention_layer_norm": False,
            "input_emb_norm": False,
        }
        for key, want in expected.items():
            if key in raw and raw[key] != want and not (want is None and raw[key] is False):
                raise CheckpointError(
                    f"{where}: {key}={raw[key]!r} is not supported (only {want!r})"
                )
        if raw.get("include_qkv_bias"):
            raise CheckpointError(f"{where}: include_qkv_bias=true is not supported")
        if raw.get("rope_full_precision", True) is not True:
            raise CheckpointError(f"{where}: rope_full_precision=false is not supported")
        if raw.get("layer_norm_with_affine", True) is not True:
            raise CheckpointError(f"{where}: layer_norm_with_affine=false is not supported")
        if raw.get("bias_for_layer_norm"):
            raise CheckpointError(f"{where}: bias_for_layer_norm=true is not supported")
        if raw.get("block_group_size", 1) != 1:
            raise CheckpointError(f"{where}: block_group_size != 1 is not supported")

        d_model = int(need("d_model"))
        n_heads = int(need("n_heads"))
        n_kv_heads = int(raw.get("n_kv_heads") or n_heads)
        if d_model % n_heads:
            raise CheckpointError(f"{where}: d_model {d_model} not divisible by n_heads {n_heads}")
        if n_kv_heads != n_heads:
            raise CheckpointError(
                f"{where}: n_kv_heads={n_kv_heads} != n_heads={n_heads}; grouped-query "
                "attention is not supported for LLaDA checkpoints"
            )
        mlp_hidden = raw.get("mlp_hidden_size")
        if mlp_hidden is None:
            mlp_hidden = int(need("mlp_ratio")) * d_model
        vocab_size = int(need("vocab_size"))
        embedding_size = int(raw.get("embedding_size") or vocab_size)
        if embedding_size < vocab_size:
            raise CheckpointError(f"{where}: embedding_size < vocab_size")
        return cls(
            d_model=d_model,
            n_layers=int(need("n_layers")),
            n_heads=n_heads,
            n_kv_heads=n_kv_heads,
            mlp_hidden_size=int(mlp_hidden),
            vocab_size=vocab_size,
            embedding_size=embedding_size,
            max_sequence_length=int(need("max_sequence_length")),
            rope_theta=float(raw.get("rope_theta", 10000.0)),
            rms_norm_eps=float(raw.get("rms_norm_eps", 1e-5)),
            mask_token_id=int(need("mask_token_id")),
            eos_token_id=int(need("eos_token_id")),
            bos_token_id=raw.get("bos_token_id"),
            pad_token_id=raw.get("pad_token_id"),
            scale_logits=bool(raw.get("scale_logits", False)),
            weight_tying=bool(raw.get("weight_tying", False)),
        )

    @classmethod
    def from_folder(cls, folder: str) -> "LLaDAConfig":
        path = os.path.join(folder, "config.json")
        if not os.path.isfile(path):
            raise CheckpointError(f"{folder}: no config.json")
        try:
            with open(path) as f:
                raw = json.load(f)
        except json.JSONDecodeError as e:
            raise CheckpointError(f"{path}: not valid JSON ({e})") from e
        return cls.from_dict(raw, where=path)

    def to_dict(self) -> dict[str, Any]:
        """A config.json body that `from_dict` reads back (used to build test checkpoints)."""
        return {
            "model_type": "llada",
            "architectures": ["LLaDAModelLM"],
            "block_type": "llama",
            "layer_norm_type": "rms",
            "activation_type": "silu",
            "rope": True,
            "rope_full_precision": True,
            "alibi": False,
            "include_bias": False,
            "include_qkv_bias": False,
            "d_model": self.d_model,
            "n_layers": self.n_layers,
            "n_heads": self.n_heads,
            "n_kv_heads": self.n_kv_heads,
            "mlp_hidden_size": self.mlp_hidden_size,
            "vocab_size": self.vocab_size,
            "embedding_size": self.embedding_size,
            "max_sequence_length": self.max_sequence_length,
            "rope_theta": self.rope_theta,
            "rms_norm_eps": self.rms_norm_eps,
            "mask_token_id": self.mask_token_id,
            "eos_token_id": self.eos_token_id,
            "bos_token_id": self.bos_token_id,
            "pad_token_id": self.pad_token_id,
            "scale_logits": self.scale_logits,
            "weight_tying": self.weight_tying,
        }


def llada_8b_config() -> LLaDAConfig:
    """The LLaDA-8B-Instruct / LLaDA-1.5 shape (for random-weight speed checkpoints)."""
    return LLaDAConfig(
        d_model=4096, n_layers=32, n_heads=32, n_kv_heads=32, mlp_hidden_size=12288,
        vocab_size=126464, embedding_size=126464, max_sequence_length=4096,
        rope_theta=500000.0, rms_norm_eps=1e-5, mask_token_id=126336,
        eos_token_id=126081, bos_token_id=126080, pad_token_id=126081,
    )
