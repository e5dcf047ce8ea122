"""The fused path of a step (CUDA): padded passes of fixed geometry, Triton kernels, CUDA graphs.

The reference path (`core.step_runner`, plain torch, each policy's own per-layer hooks) is
the definition; this package computes the same tokens faster for the policies `none`,
`prefix`, `dual`, `dkv` and `elastic` (checked in float32):

    step.py     FusedStep: a step as passes; Elastic-Cache's row pass stopped where the
                batch is expected to refresh, the refreshes run on with the other rows
    plan.py     a pass's plan: padded geometry and packed indices (one upload a pass)
    layers.py   the layers of a pass, decisions included (graph-capturable)
    ops.py      their operations: a Triton kernel (`vllm_elastic.kernels`) or torch
    graphs.py   runs passes eagerly or as one CUDA graph per geometry

On the CPU the same code runs with the torch operations (tests compare it with the
reference path).
"""

from .step import FusedDecision, FusedStep

__all__ = ["FusedDecision", "FusedStep"]
