"""Reading a published LLaDA checkpoint folder as it is: sharded safetensors with an index."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from contextlib import ExitStack
from typing import Any

import torch

from .config import CheckpointError, LLaDAConfig

PREFIX = "model.transformer."
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")


def layer_tensor_names(i: int) -> list[str]:
    b = f"{PREFIX}blocks.{i}."
    return [b + n + ".weight" for n in (
        "attn_norm", "q_proj", "k_proj", "v_proj", "attn_out",
        "ff_norm", "ff_proj", "up_proj", "ff_out",
    )]


def expected_tensor_names(cfg: LLaDAConfig) -> list[str]:
    names = [PREFIX + "wte.weight", PREFIX + "ln_f.weight"]
    if not cfg.weight_tying:
        names.append(PREFIX + "ff_out.weight")
    for i in range(cfg.n_layers):
        names += layer_tensor_names(i)
    return names


def check_folder(folder: str, need_tokenizer: bool = True) -> LLaDAConfig:
    """Validate a checkpoint folder before any work; returns its config."""
    if not os.path.isdir(folder):
        raise CheckpointError(f"{folder}: not a directory")
    cfg = LLaDAConfig.from_folder(folder)
    if need_tokenizer:
        missing = [f for f in TOKENIZER_FILES if not os.path.isfile(os.path.join(folder, f))]
        if missing:
            raise CheckpointError(f"{folder}: tokenizer file(s) missing: {', '.join(missing)}")
    weight_map = _weight_map(folder)
    missing_shards = sorted({s for s in weight_map.values()
                             if not os.path.isfile(os.path.join(folder, s))})
    if missing_shards:
        raise CheckpointError(f"{folder}: weight shard(s) missing: {', '.join(missing_shards)}")
    absent = [n for n in expected_tensor_names(cfg) if n not in weight_map]
    if absent:
        more = f" (and {len(absent) - 3} more)" if len(absent) > 3 else ""
        raise CheckpointError(f"{folder}: tensors missing from the checkpoint: "
                              f"{', '.join(absent[:3])}{more}")
    return cfg


def _weight_map(folder: str) -> dict[str, str]:
    index = os.path.join(folder, "model.safetensors.index.json")
    single = os.path.join(folder, "model.safetensors")
    if os.path.isfile(index):
        try:
            with open(index) as f:
                return dict(json.load(f)["weight_map"])
        except (json.JSONDecodeError, KeyError) as e:
            raise CheckpointError(f"{index}: unreadable index ({e})") from e
    if os.path.isfile(single):
        from safetensors import safe_open

        with safe_open(single, framework="pt") as f:
            return {k: "model.safetensors" for k in f.keys()}
    raise CheckpointError(
        f"{folder}: no weights (neither model.safetensors.index.json nor model.safetensors)"
    )


class CheckpointReader:
    """Opens every shard once; reads whole tensors or a tensor-parallel slice of one."""

    def __init__(self, folder: str):
        from safetensors import safe_open

        self.folder = folder
        self.weight_map = _weight_map(folder)
        self._stack = ExitStack()
        self._files: dict[str, Any] = {}
        for shard in sorted(set(self.weight_map.values())):
            self._files[shard] = self._stack.enter_context(
                safe_open(os.path.join(folder, shard), framework="pt")
            )

    def __enter__(self) -> "CheckpointReader":
        return self

    def __exit__(self, *exc: object) -> None:
        self._stack.close()

    def _slice(self, name: str) -> Any:
        if name not in self.weight_map:
            raise CheckpointError(f"{self.folder}: tensor {name} missing")
        return self._files[self.weight_map[name]].get_slice(name)

    def read(self, name: str, dim: int | None = None, start: int = 0, end: int | None = None
             ) -> torch.Tensor:
        """The tensor, or rows/columns [start, end) of it along `dim` (0 or 1)."""
        s = self._slice(name)
        if dim is None:
            return s[:]
        if dim == 0:
            return s[start:end]
        return s[:, start:end]

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._slice(name).get_shape())

    def check_shapes(self, cfg: LLaDAConfig) -> None:
        """Every tensor's full shape must be what the config says (before any slicing)."""
        d, m, v = cfg.d_model, cfg.mlp_hidden_size, cfg.embedding_size
        want = {PREFIX + "wte.weight": (v, d), PREFIX + "ln_f.weight": (d,)}
        if not cfg.weight_tying:
            want[PREFIX + "ff_out.weight"] = (v, d)
        for i in range(cfg.n_layers):
            b = f"{PREFIX}blocks.{i}."
            want.update({b + "attn_norm.weight": (d,), b + "ff_norm.weight": (d,),
                         b + "q_proj.weight": (d, d), b + "k_proj.weight": (d, d),
                         b + "v_proj.weight": (d, d), b + "attn_out.weight": (d, d),
                         b + "ff_proj.weight": (m, d), b + "up_proj.weight": (m, d),
                         b + "ff_out.weight": (d, m)})
        for name, shape in want.items():
            got = self.shape(name)
            if got != shape:
                raise CheckpointError(
                    f"{self.folder}: {name} has shape {got}, which does not match config "
                    f"(expected {shape})")

    def names(self) -> Iterator[str]:
        return iter(self.weight_map)
