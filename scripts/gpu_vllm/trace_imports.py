#!/usr/bin/env python3
"""Import everything vllm-elastic's start-up paths import from vLLM 0.26, build the
`vllm serve` argument parser and the OpenAI API app, load a tokenizer and render a chat
template through vLLM, then report sys.modules -> distributions.

Used two ways:
  * here (no GPU): `LD_LIBRARY_PATH=<dir with a stub libcuda.so.1> python trace_imports.py
    --force-cuda --model .gpu_vllm/tinyllama` in a venv holding the full vLLM, to find which
    distributions are needed, and in a fresh venv holding only the GPU image's packages +
    the bundle (PYTHONPATH=<site>) to prove the bundle is complete (--strict);
  * on the GPU machine: the same line without the stub, as a smoke test of the install.

--force-cuda makes vllm.platforms pick CudaPlatform although no GPU is visible (this
process only; no vLLM file is changed).
Exit status with --strict: 1 if any import or step failed.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import importlib.metadata as md
import io
import json
import os
import sys
import traceback

MODULES = [
    # package roots and what the plugin imports (vllm_elastic/*)
    "vllm",
    "vllm.config",
    "vllm.logger",
    "vllm.exceptions",
    "vllm.inputs",
    "vllm.outputs",
    "vllm.sampling_params",
    "vllm.engine.arg_utils",
    "vllm.platforms",
    "vllm.platforms.cuda",
    "vllm.transformers_utils.config",
    "vllm.model_executor.models",
    "vllm.model_executor.models.config",
    "vllm.model_executor.models.registry",
    "vllm.model_executor.model_loader",
    "vllm.model_executor.models.llama",  # the tiny test model's architecture
    "vllm.distributed.parallel_state",
    "vllm.distributed.device_communicators.cuda_communicator",
    "vllm.distributed.device_communicators.pynccl",
    "vllm.distributed.device_communicators.custom_all_reduce",
    # CLI / server
    "vllm.entrypoints.cli.main",
    "vllm.entrypoints.cli.serve",
    "vllm.entrypoints.cli.openai",
    "vllm.entrypoints.cli.launch",
    "vllm.entrypoints.cli.run_batch",
    "vllm.entrypoints.cli.collect_env",
    "vllm.entrypoints.cli.benchmark.main",
    "vllm.entrypoints.openai.api_server",
    "vllm.entrypoints.openai.cli_args",
    "vllm.entrypoints.openai.chat_completion.serving",
    "vllm.entrypoints.openai.chat_completion.api_router",
    "vllm.entrypoints.openai.chat_completion.protocol",
    "vllm.entrypoints.openai.completion.serving",
    "vllm.entrypoints.openai.completion.api_router",
    "vllm.entrypoints.openai.models.serving",
    "vllm.entrypoints.openai.models.api_router",
    "vllm.entrypoints.generate.api_router",
    "vllm.entrypoints.serve",
    "vllm.entrypoints.serve.instrumentator.metrics",
    "vllm.entrypoints.serve.sagemaker.api_router",
    "vllm.entrypoints.scale_out.factories",
    "vllm.entrypoints.launcher",
    "vllm.entrypoints.chat_utils",
    "vllm.entrypoints.llm",
    "vllm.renderers",
    "vllm.renderers.hf",
    "vllm.renderers.registry",
    "vllm.renderers.online_renderer",
    "vllm.tokenizers",
    "vllm.tokenizers.hf",
    "vllm.reasoning",
    "vllm.tool_parsers",
    "vllm.parser",
    # engine
    "vllm.v1.engine.core",
    "vllm.v1.engine.core_client",
    "vllm.v1.engine.async_llm",
    "vllm.v1.engine.llm_engine",
    "vllm.v1.engine.input_processor",
    "vllm.v1.engine.output_processor",
    "vllm.v1.engine.detokenizer",
    "vllm.v1.engine.coordinator",
    "vllm.v1.executor",
    "vllm.v1.executor.multiproc_executor",
    "vllm.v1.executor.uniproc_executor",
    "vllm.v1.core.sched.scheduler",
    "vllm.v1.core.sched.async_scheduler",
    "vllm.v1.core.kv_cache_manager",
    "vllm.v1.core.kv_cache_utils",
    "vllm.v1.kv_cache_interface",
    "vllm.v1.outputs",
    "vllm.v1.request",
    "vllm.v1.metrics.loggers",
    "vllm.v1.metrics.prometheus",
    "vllm.v1.metrics.stats",
    "vllm.v1.structured_output",
    "vllm.v1.serial_utils",
    # worker
    "vllm.v1.worker.worker_base",
    "vllm.v1.worker.gpu_worker",
    "vllm.v1.worker.gpu_model_runner",
    "vllm.v1.worker.gpu_input_batch",
    "vllm.v1.sample.sampler",
    "vllm.v1.attention.backends.triton_attn",
    "vllm.v1.attention.selector",
    "vllm.compilation.backends",
    "vllm.compilation.wrapper",
]


class _ForceCudaHook:
    """Meta-path finder: once vllm.platforms has executed, make its platform detection
    return CudaPlatform. vllm/__init__ resolves current_platform while it imports, so the
    patch must be in place before `import vllm`. Nothing on disk is changed."""

    def find_spec(self, name, path=None, target=None):
        if name != "vllm.platforms":
            return None
        sys.meta_path.remove(self)
        import importlib.util

        spec = importlib.util.find_spec(name)
        orig = spec.loader.exec_module

        def exec_module(mod):
            orig(mod)
            mod.builtin_platform_plugins.clear()
            mod.builtin_platform_plugins["cuda"] = lambda: "vllm.platforms.cuda.CudaPlatform"

        spec.loader.exec_module = exec_module
        return spec


class _WhoImports:
    """Meta-path finder that records, for each top-level package's first import, the
    innermost vllm frame that asked for it (file:line)."""

    def __init__(self):
        self.first: dict[str, str] = {}

    def find_spec(self, name, path=None, target=None):
        top = name.split(".")[0]
        if top in self.first or top in sys.modules or top in ("vllm", "__main__"):
            return None
        f = sys._getframe(1)
        where = "?"
        while f is not None:
            fn = f.f_code.co_filename
            if "/vllm/" in fn and "importlib" not in fn:
                where = f"{fn.split('/vllm/', 1)[1]}:{f.f_lineno}"
                break
            f = f.f_back
        self.first[top] = where
        return None


WHO = _WhoImports()


def force_cuda_platform() -> None:
    if "vllm" in sys.modules:
        raise RuntimeError("vllm already imported")
    sys.meta_path.insert(0, _ForceCudaHook())


def step(name, fn, errors):
    try:
        out = fn()
        print(f"[ok]   {name}" + (f": {out}" if out else ""))
    except BaseException as e:  # noqa: BLE001
        if isinstance(e, SystemExit) and e.code in (0, None):
            print(f"[ok]   {name} (exit 0)")
            return
        errors.append((name, "".join(traceback.format_exception(e))[-3000:]))
        print(f"[FAIL] {name}: {type(e).__name__}: {e}")


def cli_help():
    from vllm.entrypoints.cli.main import main

    old = sys.argv
    sys.argv = ["vllm", "serve", "--help"]
    buf = io.StringIO()
    try:
        with contextlib.redirect_stdout(buf):
            main()
    finally:
        sys.argv = old
    return f"{len(buf.getvalue())} chars of help"


def serve_args(model):
    from vllm.entrypoints.openai.cli_args import make_arg_parser, validate_parsed_serve_args
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    parser = make_arg_parser(FlexibleArgumentParser())
    args = parser.parse_args([model or "dummy", "--max-model-len", "512"])
    args.model = model or "dummy"
    validate_parsed_serve_args(args)
    return args


def build_app(model):
    from vllm.entrypoints.openai.api_server import build_app as _build

    app = _build(serve_args(model), supported_tasks=("generate",))
    paths = sorted({getattr(r, "path", "") for r in app.routes})
    need = ["/v1/chat/completions", "/v1/completions", "/metrics", "/v1/models", "/health"]
    missing = [p for p in need if p not in paths]
    if missing:
        raise RuntimeError(f"routes missing: {missing}")
    return f"{len(paths)} routes incl. {need}"


def tokenizer_and_template(model):
    from vllm.tokenizers import get_tokenizer

    tok = get_tokenizer(model)
    ids = tok.encode("Hello world")
    msgs = [{"role": "user", "content": "What is 2+3?"}]
    text = tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    return f"{type(tok).__name__}, {len(ids)} ids, template {len(text)} chars"


def chat_utils_parse(model):
    # What the chat endpoint does before rendering: parse the OpenAI messages.
    from vllm.entrypoints.chat_utils import parse_chat_messages  # noqa: F401

    return "parse_chat_messages importable"


def engine_args(model):
    from vllm.engine.arg_utils import EngineArgs

    ea = EngineArgs(model=model, max_model_len=512, enforce_eager=True)
    cfg = ea.create_model_config()
    return f"ModelConfig arch={cfg.architectures} dtype={cfg.dtype}"


def dist_report(image: set[str]):
    pkgs = md.packages_distributions()
    used: dict[str, set[str]] = {}
    for name in list(sys.modules):
        top = name.split(".")[0]
        if not top or top.startswith("_") and top not in pkgs:
            continue
        for d in pkgs.get(top, []):
            used.setdefault(d, set()).add(top)
    rows = []
    for d in sorted(used, key=str.lower):
        try:
            v = md.version(d)
            loc = str(md.distribution(d).locate_file(""))
        except Exception:  # noqa: BLE001
            v, loc = "?", "?"
        norm = d.lower().replace("_", "-")
        rows.append((d, v, norm in image, loc))
    return rows


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--force-cuda", action="store_true")
    ap.add_argument("--model", default=None, help="HF folder (tokenizer + config)")
    ap.add_argument("--image-list", default=None, help="pip freeze of the GPU image")
    ap.add_argument("--json", default=None)
    ap.add_argument("--strict", action="store_true")
    a = ap.parse_args()
    sys.meta_path.insert(0, WHO)

    errors: list = []
    if a.force_cuda:
        step("force CUDA platform", force_cuda_platform, errors)
    for m in MODULES:
        step(f"import {m}", lambda m=m: importlib.import_module(m) and None, errors)

    def platform():
        from vllm.platforms import current_platform

        return type(current_platform).__name__

    step("current_platform", platform, errors)
    step("vllm serve --help (CLI parser)", cli_help, errors)
    step("build_app (OpenAI server routes)", lambda: build_app(a.model), errors)
    if a.model:
        step("tokenizer + chat template", lambda: tokenizer_and_template(a.model), errors)
        step("EngineArgs.create_model_config", lambda: engine_args(a.model), errors)
    step("chat_utils", lambda: chat_utils_parse(a.model), errors)

    image = set()
    if a.image_list:
        for line in open(a.image_list):
            n = line.split("==")[0].strip().lower().replace("_", "-")
            if n:
                image.add(n)
    rows = dist_report(image)
    print(f"\n{len(sys.modules)} modules loaded; distributions behind them:")
    pkgs = md.packages_distributions()
    for d, v, in_image, loc in rows:
        tag = "image" if in_image else "NOT-IN-IMAGE"
        tops = sorted(t for t, ds in pkgs.items() if d in ds and t in sys.modules)
        who = "; ".join(f"{t} <- {WHO.first.get(t, '?')}" for t in tops)
        print(f"  {d}=={v:<14} {tag:<13} {who}")
    if a.json:
        with open(a.json, "w") as f:
            json.dump(
                {
                    "errors": errors,
                    "modules": sorted(sys.modules),
                    "dists": [dict(name=d, version=v, in_image=i, loc=l) for d, v, i, l in rows],
                },
                f,
                indent=1,
            )
    print(f"\n{len(errors)} failures")
    for name, tb in errors:
        print(f"--- {name}\n{tb}")
    if a.strict and errors:
        sys.exit(1)


if __name__ == "__main__":
    main()
