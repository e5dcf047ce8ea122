"""Engine settings vLLM must use for LLaDA checkpoints, set automatically at config time.

Hooked into vLLM through `MODELS_CONFIG_MAP["LLaDAModelLM"]` (see `registration.py`):
vLLM calls `verify_and_update_config` while it builds the VllmConfig, so `vllm serve
<LLaDA folder>` / `LLM(model=<LLaDA folder>)` need no extra flags. Equivalent explicit flags:

    --scheduler-cls vllm_elastic.vllm_plugin.scheduler.ElasticScheduler
    --worker-cls vllm_elastic.vllm_plugin.gpu_worker.ElasticGPUWorker   (CUDA)
    --worker-cls vllm_elastic.vllm_plugin.cpu_worker.ElasticCPUWorker   (CPU)
    --compilation-config '{"mode": 0, "cudagraph_mode": "NONE"}' --no-enable-prefix-caching
    --no-enable-chunked-prefill --no-async-scheduling --max-num-batched-tokens <see below>

vLLM's own CUDA graphs are off because LLaDA has no vLLM forward pass; the core captures
its passes as CUDA graphs itself (`--enforce-eager` does not change that).

A scheduler or worker class given explicitly is kept (so a subclass can be swapped in).
"""

from __future__ import annotations


from vllm.model_executor.models.config import VerifyAndUpdateConfig

from .request_params import server_defaults

from vllm.logger import init_logger

logger = init_logger("vllm." + __name__)  # under vLLM's configured "vllm" logger

SCHEDULER_CLS = "vllm_elastic.vllm_plugin.scheduler.ElasticScheduler"
WORKER_CLS = {
    "cpu": "vllm_elastic.vllm_plugin.cpu_worker.ElasticCPUWorker",
    "cuda": "vllm_elastic.vllm_plugin.gpu_worker.ElasticGPUWorker",
}
# Upper bound for the per-step token budget we raise to (vLLM sizes runner buffers by it).
_MAX_AUTO_BUDGET = 65536


class LLaDAEngineConfig(VerifyAndUpdateConfig):
    @staticmethod
    def verify_and_update_config(vllm_config) -> None:
        from vllm.config import CompilationMode, CUDAGraphMode
        from vllm.platforms import current_platform

        from vllm_elastic.core.params import GenerationParams

        # A bad --additional-config fails start-up here.
        base = GenerationParams.from_dict(server_defaults(vllm_config))
        if vllm_config.lora_config is not None:
            raise ValueError("LLaDA (vllm-elastic) does not support LoRA adapters")
        if vllm_config.speculative_config is not None:
            raise ValueError("LLaDA (vllm-elastic) does not support speculative decoding")
        platform = ("cpu" if current_platform.is_cpu()
                    else "cuda" if current_platform.is_cuda() else None)
        if platform is None:
            raise ValueError(
                f"vllm-elastic's vLLM adapters exist for vLLM's CPU and CUDA platforms, not "
                f"{current_platform.device_name!r}; run the engine core directly there "
                "(vllm_elastic.core.Engine)")

        sc = vllm_config.scheduler_config
        pc = vllm_config.parallel_config
        if sc.scheduler_cls is None:
            sc.scheduler_cls = SCHEDULER_CLS
        if pc.worker_cls == "auto":
            pc.worker_cls = WORKER_CLS[platform]
        sc.async_scheduling = False
        # Our runner has no vLLM forward to compile or capture; NONE also skips vLLM's
        # warm-up forward pass.
        vllm_config.compilation_config.mode = CompilationMode.NONE
        vllm_config.compilation_config.cudagraph_mode = CUDAGraphMode.NONE
        # LLaDA's KV depends on the whole canvas: no prefix sharing, no partial prompts.
        vllm_config.cache_config.enable_prefix_caching = False
        sc.enable_chunked_prefill = False
        # Each step "schedules" every running request's remaining canvas, and a pass may
        # compute every position of every running request (full passes, refreshes): let
        # the budget hold max_num_seqs requests of max_model_len (the runner bounds a
        # pass's rows by it, and splits larger batches).
        max_len = vllm_config.model_config.max_model_len
        want = max(max_len + sc.max_num_seqs * base.decode.gen_length, sc.max_num_seqs * max_len)
        budget = max(sc.max_num_batched_tokens, max_len, min(want, _MAX_AUTO_BUDGET))
        if budget != sc.max_num_batched_tokens:
            logger.info("vllm-elastic: max_num_batched_tokens %d -> %d",
                        sc.max_num_batched_tokens, budget)
            sc.max_num_batched_tokens = budget
        logger.info("vllm-elastic: LLaDA adapters active (scheduler %s, worker %s, "
                    "defaults %s)", sc.scheduler_cls, pc.worker_cls, base.to_dict())
