"""The GPU adapters' platform-independent parts, on the CPU (no engine start).

On a CPU machine vLLM's GPU worker cannot run; what can be checked here is that the GPU
adapters import against the installed vLLM, that LLaDA checkpoints get the GPU worker on
the CUDA platform (and the CPU worker on the CPU), that the step runner's row budget (what
vLLM's profile run measures) splits batches without changing tokens, and the profile pass.
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest

pytestmark = pytest.mark.vllm


def test_gpu_adapters_import_and_shape():
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner
    from vllm.v1.worker.gpu_worker import Worker

    from vllm_elastic.vllm_plugin import gpu_worker
    from vllm_elastic.vllm_plugin.model_runner import ElasticRunnerMixin

    mro = gpu_worker.ElasticGPUModelRunner.__mro__
    assert mro.index(ElasticRunnerMixin) < mro.index(GPUModelRunner)
    assert issubclass(gpu_worker.ElasticGPUWorker, Worker)
    # What vLLM's own GPU runner would do instead must be ours.
    for name in ("load_model", "get_kv_cache_spec", "initialize_kv_cache", "execute_model",
                 "capture_model", "take_draft_token_ids"):
        assert getattr(gpu_worker.ElasticGPUModelRunner, name) is \
            getattr(ElasticRunnerMixin, name), name
    assert gpu_worker.ElasticGPUModelRunner.profile_run is not GPUModelRunner.profile_run
    times = gpu_worker.ElasticGPUWorker.compile_or_warm_up_model(None)
    assert tuple(times) == (0.0, 0.0)


class _Platform:
    def __init__(self, kind: str):
        self.kind = kind
        self.device_name = kind

    def is_cpu(self) -> bool:
        return self.kind == "cpu"

    def is_cuda(self) -> bool:
        return self.kind == "cuda"


def _config(worker_cls: str = "auto"):
    return SimpleNamespace(
        additional_config={"elastic": {"policy": "elastic"}}, lora_config=None,
        speculative_config=None,
        scheduler_config=SimpleNamespace(scheduler_cls=None, async_scheduling=True,
                                         enable_chunked_prefill=True,
                                         max_num_batched_tokens=2048, max_num_seqs=8),
        parallel_config=SimpleNamespace(worker_cls=worker_cls),
        compilation_config=SimpleNamespace(mode=None, cudagraph_mode=None),
        cache_config=SimpleNamespace(enable_prefix_caching=True),
        model_config=SimpleNamespace(max_model_len=1024))


@pytest.mark.parametrize("kind,worker", [
    ("cuda", "vllm_elastic.vllm_plugin.gpu_worker.ElasticGPUWorker"),
    ("cpu", "vllm_elastic.vllm_plugin.cpu_worker.ElasticCPUWorker"),
])
def test_worker_chosen_per_platform(monkeypatch, kind, worker):
    import vllm.platforms
    from vllm.config import CompilationMode, CUDAGraphMode

    from vllm_elastic.vllm_plugin.engine_config import SCHEDULER_CLS, LLaDAEngineConfig

    monkeypatch.setattr(vllm.platforms, "_current_platform", _Platform(kind))
    cfg = _config()
    LLaDAEngineConfig.verify_and_update_config(cfg)
    assert cfg.parallel_config.worker_cls == worker
    assert cfg.scheduler_config.scheduler_cls == SCHEDULER_CLS
    assert cfg.scheduler_config.async_scheduling is False
    assert cfg.compilation_config.mode == CompilationMode.NONE
    assert cfg.compilation_config.cudagraph_mode == CUDAGraphMode.NONE
    assert not cfg.cache_config.enable_prefix_caching
    # Every running request may be a full pass of max_model_len positions.
    assert cfg.scheduler_config.max_num_batched_tokens == 8 * 1024
    explicit = _config("my.Worker")  # a class given explicitly is kept
    LLaDAEngineConfig.verify_and_update_config(explicit)
    assert explicit.parallel_config.worker_cls == "my.Worker"


def test_other_platform_refused(monkeypatch):
    import vllm.platforms

    from vllm_elastic.vllm_plugin.engine_config import LLaDAEngineConfig

    monkeypatch.setattr(vllm.platforms, "_current_platform", _Platform("tpu"))
    with pytest.raises(ValueError, match="CPU and CUDA platforms"):
        LLaDAEngineConfig.verify_and_update_config(_config())


def test_row_budget_splits_batches_same_tokens(engine, dev_prompts):
    """A batch over the row budget is stepped in groups; the tokens do not change."""
    from vllm_elastic.core import GenerationParams

    prompts = dev_prompts[:4]
    params = [GenerationParams.from_dict({"policy": p, "gen_length": 32, "block_length": 32})
              for p in ("elastic", "dual", "none", "dkv")]
    want = [r.token_ids for r in engine.generate(prompts, params)]
    longest = max(len(p) for p in prompts) + 32
    calls = []
    step = engine.runner._step
    engine.runner.max_rows = longest + 1  # no two requests fit together
    engine.runner._step = lambda reqs: calls.append(len(reqs)) or step(reqs)
    try:
        got = [r.token_ids for r in engine.generate(prompts, params)]
    finally:
        engine.runner.max_rows = None
        del engine.runner._step
    assert got == want
    assert calls and max(calls) == 1


def test_profile_pass_runs_the_largest_pass(model_dir):
    """The profile pass computes max_pass_rows rows at most, in requests of full passes."""
    from model_executor.llada import LLaDAModel
    from model_executor.tokenizer import special_ids
    from vllm_elastic.vllm_plugin.model_runner import ElasticRunnerMixin

    runner = ElasticRunnerMixin()
    runner.core_model = LLaDAModel.from_pretrained(model_dir)
    runner.special = special_ids(model_dir)
    runner.model_config = SimpleNamespace(max_model_len=300)
    runner.scheduler_config = SimpleNamespace(max_num_batched_tokens=640)
    runner.cache_config = SimpleNamespace(block_size=16)
    assert runner.max_pass_rows == 640
    assert runner.profile_pass() == 2 * 299  # two requests of max_model_len - 1


def test_model_executor_taken_back_from_vllms_alias(monkeypatch):
    """vLLM's LazyLoader leaves its own module in sys.modules["model_executor"]."""
    import sys
    import types

    from vllm_elastic.vllm_plugin import compat

    monkeypatch.setitem(sys.modules, "model_executor", types.ModuleType("model_executor"))
    for name in [n for n in sys.modules if n.startswith("model_executor.")]:
        monkeypatch.delitem(sys.modules, name)
    compat.claim_model_executor()
    from model_executor.llada import LLaDAModel  # noqa: F401

    assert sys.modules["model_executor"].__file__.endswith("model_executor/__init__.py")


def test_install_runner_replaces_vllms_own_runner():
    from vllm_elastic.vllm_plugin import compat

    class Ours:
        pass

    worker = SimpleNamespace(model_runner=object())  # vLLM 0.26: its runner, built inline
    compat.install_runner(worker, Ours, Ours)
    assert isinstance(worker.model_runner, Ours)
    kept = worker.model_runner  # vLLM 0.32: ours already, through _make_model_runner
    compat.install_runner(worker, Ours, Ours)
    assert worker.model_runner is kept
