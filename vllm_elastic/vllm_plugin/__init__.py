"""vLLM plugin: serve LLaDA checkpoints with the vllm_elastic engine core.

Loaded by vLLM through the `vllm.general_plugins` entry point `elastic`
(`VLLM_PLUGINS=elastic`). `register()` is cheap and idempotent; it runs in every vLLM
process (API server, engine core, workers). All diffusion logic lives in
`vllm_elastic.core`; the modules here only adapt vLLM's scheduler, worker and frontend.
"""

from __future__ import annotations


def register() -> None:
    from .registration import register as _register

    _register()


__all__ = ["register"]
