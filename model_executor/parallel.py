"""Tensor-parallel context: which shard this process holds and how shards are combined.

The model never imports a distributed framework of its own: it is handed a
`TensorParallel` built from a torch.distributed process group (standalone, gloo or NCCL)
or from vLLM's tensor-parallel group (the plugin adapts it). One process by default.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch


@dataclass
class TensorParallel:
    rank: int = 0
    world_size: int = 1
    group: Any = None  # a torch.distributed ProcessGroup, or None for one process
    # Optional overrides (vLLM's group exposes its own collectives).
    all_reduce_fn: Any = None
    all_gather_fn: Any = None

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @classmethod
    def from_process_group(cls, group: Any = None) -> "TensorParallel":
        import torch.distributed as dist

        return cls(rank=dist.get_rank(group), world_size=dist.get_world_size(group), group=group)

    def shard(self, n: int, what: str) -> tuple[int, int]:
        """[start, end) of this rank's equal share of `n` items."""
        if n % self.world_size:
            raise ValueError(
                f"{what}={n} is not divisible by the tensor-parallel size {self.world_size}"
            )
        size = n // self.world_size
        return self.rank * size, (self.rank + 1) * size

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        """Sum over ranks (in place where possible); identity on one process."""
        if not self.enabled:
            return x
        if self.all_reduce_fn is not None:
            return self.all_reduce_fn(x)
        import torch.distributed as dist

        dist.all_reduce(x, group=self.group)
        return x

    def all_gather_last(self, x: torch.Tensor) -> torch.Tensor:
        """Concatenate each rank's shard along the last dimension."""
        if not self.enabled:
            return x
        if self.all_gather_fn is not None:
            return self.all_gather_fn(x)
        import torch.distributed as dist

        parts = [torch.empty_like(x) for _ in range(self.world_size)]
        dist.all_gather(parts, x.contiguous(), group=self.group)
        return torch.cat(parts, dim=-1)
