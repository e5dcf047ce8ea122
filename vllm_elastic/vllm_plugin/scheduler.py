"""vLLM scheduler for LLaDA: one denoising step of every running request per engine step.

vLLM's scheduler only knows autoregressive requests. This subclass makes it drive
diffusion requests without changing its policies (FCFS / priority admission, token budget,
preemption, abort, stop checks, stats):

* Admission reserves the whole canvas: when a waiting (or preempted) request is admitted,
  `allocate_slots` gets the canvas as look-ahead, so its blocks cover prompt + gen_length
  from the start; a request is admitted only when all its blocks fit, and a running request
  never needs more blocks (no preempt/re-admit thrash under memory pressure).
* Every running request is scheduled each step: its remaining canvas is presented as
  placeholder speculative tokens, so a step that commits nothing still schedules it.
  `update_from_output` rolls the placeholders back itself (the runner's sampled tokens are
  the final prefix committed this step, 0..n of them).
* Stop conditions line up with the core's: EOS or end of turn (added to the stop token
  ids) -> "stop"; gen_length or max_tokens, whichever is smaller -> "length".
* The runner's per-step cache statistics travel back in `ModelRunnerOutput.elastic_stats`
  and leave the engine core in `SchedulerStats` (see `metrics.py`).
"""

from __future__ import annotations

from typing import Any

from vllm.v1.core.sched.scheduler import Scheduler
from vllm.v1.request import RequestStatus

from .metrics import STATS_PREFIX, STAT_KEYS
from .request_params import gen_length_of, server_defaults


class ElasticScheduler(Scheduler):
    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self._base = server_defaults(self.vllm_config)
        from model_executor.tokenizer import folder_special_ids

        mc = self.vllm_config.model_config
        self._special = folder_special_ids(mc.model, need_tokenizer=not mc.skip_tokenizer_init)
        self._stats = dict.fromkeys(STAT_KEYS, 0)
        allocate = self.kv_cache_manager.allocate_slots

        def allocate_slots(request, num_new_tokens, *a, num_lookahead_tokens=0, **kw):
            if request.status in (RequestStatus.WAITING, RequestStatus.PREEMPTED):
                num_lookahead_tokens = max(num_lookahead_tokens, self._canvas_left(request))
            return allocate(request, num_new_tokens, *a,
                            num_lookahead_tokens=num_lookahead_tokens, **kw)

        self.kv_cache_manager.allocate_slots = allocate_slots

    # -- per-request bookkeeping ---------------------------------------------------------

    def _canvas_left(self, request) -> int:
        """Canvas positions not yet emitted (the KV the request still needs)."""
        return max(0, request.elastic_gen_length - request.num_output_tokens)

    def add_request(self, request) -> None:
        sp = request.sampling_params
        if sp is not None and not hasattr(request, "elastic_gen_length"):
            gen = gen_length_of(sp, self._base)
            request.elastic_gen_length = gen
            request.max_tokens = min(request.max_tokens, gen)
            if not sp.ignore_eos:
                stops = list(sp.stop_token_ids or [])
                for t in self._special.stop:
                    if t not in stops and t != sp.eos_token_id:
                        stops.append(t)
                sp.stop_token_ids = stops
        super().add_request(request)

    # -- the step ------------------------------------------------------------------------

    def schedule(self, *args: Any, **kwargs: Any):
        for request in self.running:
            request.spec_token_ids = [self._special.mask] * self._canvas_left(request)
        return super().schedule(*args, **kwargs)

    def update_from_output(self, scheduler_output, model_runner_output):
        for req_id in list(scheduler_output.num_scheduled_tokens):
            spec = scheduler_output.scheduled_spec_decode_tokens.pop(req_id, None)
            request = self.requests.get(req_id)
            if spec and request is not None and not request.is_finished():
                request.num_computed_tokens -= len(spec)
        step_stats = getattr(model_runner_output, "elastic_stats", None)
        if step_stats:
            for k, v in step_stats.items():
                self._stats[k] = self._stats.get(k, 0) + int(v)
        return super().update_from_output(scheduler_output, model_runner_output)

    def make_stats(self, *args: Any, **kwargs: Any):
        stats = super().make_stats(*args, **kwargs)
        if stats is not None and any(self._stats.values()):
            # SchedulerStats has no free-form field; running_lora_adapters (dict[str, int])
            # is unused by vLLM unless LoRA is enabled, which LLaDA refuses. Deltas since
            # the previous stats, keys prefixed so they cannot be taken for adapters.
            stats.running_lora_adapters.update(
                {STATS_PREFIX + k: v for k, v in self._stats.items()})
            self._stats = dict.fromkeys(STAT_KEYS, 0)
        return stats
