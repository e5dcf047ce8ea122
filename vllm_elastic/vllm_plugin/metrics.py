"""Elastic cache statistics on vLLM's Prometheus /metrics.

Path of the numbers: the model runner sums each step's `RequestStats` deltas (rows
computed, layers refreshed, drift events, tokens committed, ...) over the batch and attaches
them to its `ModelRunnerOutput`; the scheduler (engine core) accumulates them and ships them
in `SchedulerStats` (see `scheduler.py`); `ElasticStatLogger`, a vLLM stat logger in the
API server, turns them into Prometheus counters and gauges. Everything travels inside vLLM's
own messages, so it works with any executor (mp, Ray) and any tensor-parallel size.

Exposed (labels model_name, engine):
  vllm_elastic:denoising_steps_total      request-steps (one request advanced by one step)
  vllm_elastic:full_passes_total          request-steps that recomputed every row
  vllm_elastic:tokens_committed_total     canvas tokens committed
  vllm_elastic:rows_computed_total        rows x layers the cache policies computed
  vllm_elastic:rows_full_total            rows x layers full recompute would have computed
  vllm_elastic:layers_refreshed_total     layers that recomputed all rows, summed over steps
  vllm_elastic:layers_total               layers x request-steps
  vllm_elastic:drift_events_total         Elastic-Cache drift-triggered refreshes
  vllm_elastic:layer_refresh_fraction     layers_refreshed / layers (since start)
  vllm_elastic:compute_fraction           rows_computed / rows_full (since start)
  vllm_elastic:tokens_per_step            tokens_committed / denoising_steps (since start)
"""

from __future__ import annotations

from typing import Any

STATS_PREFIX = "vllm_elastic/"
STAT_KEYS = ("steps", "full_steps", "tokens_committed", "rows_computed", "rows_full",
             "layers_refreshed", "layers_total", "drift_events")
_COUNTERS = {
    "steps": ("denoising_steps", "Request-steps: one request advanced by one denoising step."),
    "full_steps": ("full_passes", "Request-steps that recomputed every row of the request."),
    "tokens_committed": ("tokens_committed", "Canvas tokens committed."),
    "rows_computed": ("rows_computed", "Rows x layers computed by the cache policies."),
    "rows_full": ("rows_full", "Rows x layers a full recompute would have computed."),
    "layers_refreshed": ("layers_refreshed", "Layers that recomputed every row, summed."),
    "layers_total": ("layers", "Layers x request-steps."),
    "drift_events": ("drift_events", "Elastic-Cache drift-triggered refreshes."),
}


def request_stats_vector(stats: Any) -> dict[str, int]:
    """The counters of one core `RequestStats`."""
    return {k: int(getattr(stats, k)) for k in STAT_KEYS}


def extract(scheduler_stats: Any) -> dict[str, int]:
    """Our counters from a SchedulerStats (empty when this step carried none)."""
    d = getattr(scheduler_stats, "running_lora_adapters", None) or {}
    return {k[len(STATS_PREFIX):]: v for k, v in d.items() if k.startswith(STATS_PREFIX)}


class _PromMetrics:
    """One set of Prometheus objects per process (stat loggers may be built twice)."""

    _instance: "_PromMetrics | None" = None

    def __init__(self) -> None:
        from prometheus_client import Counter, Gauge

        labels = ["model_name", "engine"]
        self.counters = {k: Counter(f"vllm_elastic:{name}", doc, labels)
                         for k, (name, doc) in _COUNTERS.items()}
        self.gauges = {
            "layer_refresh_fraction": Gauge(
                "vllm_elastic:layer_refresh_fraction",
                "Fraction of layer-steps that recomputed every row (since start).", labels),
            "compute_fraction": Gauge(
                "vllm_elastic:compute_fraction",
                "Rows computed / rows of full recompute (since start).", labels),
            "tokens_per_step": Gauge(
                "vllm_elastic:tokens_per_step",
                "Tokens committed per request-step (since start).", labels),
        }

    @classmethod
    def get(cls) -> "_PromMetrics":
        if cls._instance is None:
            cls._instance = cls()
        return cls._instance


try:
    from vllm.v1.metrics.loggers import StatLoggerBase
except ImportError:  # pragma: no cover - vLLM not installed: the core still imports
    StatLoggerBase = object  # type: ignore[assignment,misc]


class ElasticStatLogger(StatLoggerBase):  # type: ignore[misc,valid-type]
    """vLLM stat logger (API server process) publishing the elastic cache statistics."""

    def __init__(self, vllm_config: Any, engine_index: int = 0):
        self.metrics = _PromMetrics.get()
        self.labels = (str(vllm_config.model_config.served_model_name), str(engine_index))
        self.totals = dict.fromkeys(STAT_KEYS, 0)

    def record(self, scheduler_stats: Any, iteration_stats: Any, mm_cache_stats: Any = None,
               engine_idx: int = 0) -> None:
        if scheduler_stats is None:
            return
        delta = extract(scheduler_stats)
        if not delta:
            return
        for k, v in delta.items():
            if k in self.metrics.counters and v > 0:
                self.metrics.counters[k].labels(*self.labels).inc(v)
                self.totals[k] += v
        t = self.totals
        g = self.metrics.gauges
        g["layer_refresh_fraction"].labels(*self.labels).set(
            t["layers_refreshed"] / max(1, t["layers_total"]))
        g["compute_fraction"].labels(*self.labels).set(
            t["rows_computed"] / max(1, t["rows_full"]))
        g["tokens_per_step"].labels(*self.labels).set(
            t["tokens_committed"] / max(1, t["steps"]))

    def log_engine_initialized(self) -> None:
        pass

    def log(self) -> None:
        pass
