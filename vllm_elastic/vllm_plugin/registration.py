"""`register()`: the plugin's entry point (`vllm.general_plugins: elastic`).

vLLM calls it once per process (API server, engine core, every worker, the model
inspection subprocess); it must be idempotent and cheap. It registers:
1. the HF config class for `model_type: llada` (no trust_remote_code, no remote code);
2. the architecture `LLaDAModelLM` -> `vllm_elastic.vllm_plugin.model:LLaDAModelLM`;
3. `MODELS_CONFIG_MAP["LLaDAModelLM"]`: sets our scheduler/worker and engine settings
   for LLaDA checkpoints automatically (`engine_config.py`);
4. request validation in vLLM's frontend (`validation.py`), so refused requests become
   HTTP 400 before they reach the engine;
5. the stat logger publishing the cache statistics on /metrics (`metrics.py`).
None of this touches models other than LLaDA.
"""

from __future__ import annotations

import sys

from vllm.logger import init_logger

from . import compat

logger = init_logger("vllm." + __name__)  # under vLLM's configured "vllm" logger

ARCH = "LLaDAModelLM"
MODEL_CLS = "vllm_elastic.vllm_plugin.model:LLaDAModelLM"

_done = False


def register() -> None:
    global _done
    if _done:
        return
    compat.claim_model_executor()
    import vllm

    if not compat.supported(vllm.__version__):
        logger.warning("vllm-elastic supports vLLM %s, found %s: its adapters use vLLM "
                       "internals and may not work",
                       ", ".join(v + "*" for v in compat.SUPPORTED_VLLM), vllm.__version__)
    _register_config()
    _register_model()
    _register_engine_config()
    _install_request_validation()
    _install_stat_logger()
    _done = True


def _register_config() -> None:
    from transformers import AutoConfig
    from vllm.transformers_utils.config import _CONFIG_REGISTRY

    from .config import LLaDAConfig

    AutoConfig.register("llada", LLaDAConfig, exist_ok=True)
    _CONFIG_REGISTRY["llada"] = LLaDAConfig


def _register_model() -> None:
    from vllm import ModelRegistry

    if ARCH not in ModelRegistry.get_supported_archs():
        ModelRegistry.register_model(ARCH, MODEL_CLS)


def _register_engine_config() -> None:
    from vllm.model_executor.models.config import MODELS_CONFIG_MAP

    from .engine_config import LLaDAEngineConfig

    MODELS_CONFIG_MAP[ARCH] = LLaDAEngineConfig


def _is_llada(vllm_config) -> bool:
    mc = getattr(vllm_config, "model_config", None)
    return mc is not None and ARCH in (getattr(mc, "architectures", None) or [])


def _install_request_validation() -> None:
    """Wrap InputProcessor.process_inputs: validate LLaDA requests (prompt length known)."""
    from vllm.v1.engine.input_processor import InputProcessor

    if getattr(InputProcessor.process_inputs, "_vllm_elastic", False):
        return
    original = InputProcessor.process_inputs

    def process_inputs(self, request_id, prompt, params, *args, **kwargs):
        from vllm import SamplingParams

        if not (_is_llada(self.vllm_config) and isinstance(params, SamplingParams)):
            return original(self, request_id, prompt, params, *args, **kwargs)
        from .request_params import server_defaults
        from .validation import validate_request

        base = server_defaults(self.vllm_config)
        max_len = self.vllm_config.model_config.max_model_len
        validate_request(params, base, None, max_len)  # params first: clearer messages
        request = original(self, request_id, prompt, params, *args, **kwargs)
        prompt_ids = request.prompt_token_ids
        validate_request(request.sampling_params, base,
                         len(prompt_ids) if prompt_ids is not None else None, max_len)
        return request

    process_inputs._vllm_elastic = True  # type: ignore[attr-defined]
    InputProcessor.process_inputs = process_inputs


def _install_stat_logger() -> None:
    """Add ElasticStatLogger to the stat loggers vLLM's AsyncLLM builds (API server).

    The entry-point group `vllm.stat_logger_plugins` would be the declared way; the
    project's pyproject declares only the general plugin, so the factory list is extended
    here. The logger is added whatever the model (the factory list is built before the
    model is known); it publishes nothing unless the engine's stats carry ours.
    """
    from vllm.v1.metrics import loggers

    if getattr(loggers.load_stat_logger_plugin_factories, "_vllm_elastic", False):
        return
    original = loggers.load_stat_logger_plugin_factories

    def load_stat_logger_plugin_factories():
        from .metrics import ElasticStatLogger

        factories = list(original())
        if ElasticStatLogger not in factories:
            factories.append(ElasticStatLogger)
        return factories

    load_stat_logger_plugin_factories._vllm_elastic = True  # type: ignore[attr-defined]
    loggers.load_stat_logger_plugin_factories = load_stat_logger_plugin_factories
    mod = sys.modules.get("vllm.v1.engine.async_llm")
    if mod is not None and hasattr(mod, "load_stat_logger_plugin_factories"):
        mod.load_stat_logger_plugin_factories = load_stat_logger_plugin_factories
