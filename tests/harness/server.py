"""`vllm-elastic serve` on the loopback for tests and benchmarks: start, health, metrics, RSS.

`Server.start()` launches `python -m vllm_elastic.cli serve` (= `vllm serve` with the
elastic plugin) with the given settings and blocks until `GET /health` answers 200;
`stop()` terminates it. `metrics()` parses /metrics; `wait_idle()` waits until no request
runs or waits; `rss_bytes()` is the resident memory of the server's process tree.
"""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil

_WORKER_CORES = re.compile(r"local_rank=0, core ids=\[([0-9, ]*)\]")
_ABORTED = re.compile(r"Request \S+ aborted\.")
_LABEL = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"')
_SAMPLE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{[^}]*\})? ([0-9.eE+-]+|NaN|[+-]Inf)$",
                     re.M)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class ServerConfig:
    """What `vllm-elastic serve` is started with.

    `num_blocks` sets the KV pool in blocks (`--num-gpu-blocks-override`); otherwise
    `kv_space_gib` (`VLLM_CPU_KVCACHE_SPACE`) sizes it.
    """

    model_dir: str
    served_model_name: str = "mini-llada"
    elastic: dict[str, Any] = field(default_factory=lambda: {"gen_length": 64,
                                                             "block_length": 32})
    dtype: str = "float32"
    max_model_len: int = 1024
    block_size: int = 32
    max_num_seqs: int = 16
    num_blocks: int | None = None
    kv_space_gib: int = 1
    dev_mode: bool = True  # POST /reset_prefix_cache?reset_running_requests=true preempts
    log_requests: bool = True  # one log line per request; hang-ups log "Request X aborted."
    extra_args: list[str] = field(default_factory=list)
    env: dict[str, str] = field(default_factory=dict)

    def command(self, port: int) -> list[str]:
        cmd = [sys.executable, "-m", "vllm_elastic.cli", "serve", self.model_dir,
               "--served-model-name", self.served_model_name, "--host", "127.0.0.1",
               "--port", str(port), "--dtype", self.dtype,
               "--max-model-len", str(self.max_model_len),
               "--block-size", str(self.block_size), "--max-num-seqs", str(self.max_num_seqs),
               "--additional-config", json.dumps({"elastic": self.elastic})]
        if self.num_blocks is not None:
            cmd += ["--num-gpu-blocks-override", str(self.num_blocks)]
        if self.log_requests:
            cmd.append("--enable-log-requests")
        return cmd + list(self.extra_args)

    def environment(self) -> dict[str, str]:
        env = dict(os.environ, VLLM_PLUGINS="elastic",
                   VLLM_CPU_KVCACHE_SPACE=str(self.kv_space_gib))
        if self.dev_mode:
            env["VLLM_SERVER_DEV_MODE"] = "1"
        env.update(self.env)
        return env


class Server:
    """One `vllm-elastic serve` process (use as a context manager or start()/stop())."""

    def __init__(self, config: ServerConfig, log_path: str | Path):
        self.config = config
        self.log_path = Path(log_path)
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen | None = None
        self._log = None
        self.startup_s = 0.0

    def start(self, timeout: float = 300.0) -> "Server":
        self._log = open(self.log_path, "w")
        t0 = time.monotonic()
        self.proc = subprocess.Popen(self.config.command(self.port),
                                     env=self.config.environment(), stdout=self._log,
                                     stderr=subprocess.STDOUT)
        deadline = t0 + timeout
        while not self.healthy():
            if self.proc.poll() is not None:
                raise RuntimeError("vllm serve exited:\n" + self.log_tail())
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError("vllm serve did not start:\n" + self.log_tail())
            time.sleep(1.0)
        self.startup_s = time.monotonic() - t0
        return self

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self._log is not None:
            self._log.close()
            self._log = None

    def __enter__(self) -> "Server":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- state ---------------------------------------------------------------------------

    def healthy(self, timeout: float = 2.0) -> bool:
        """GET /health answers 200 and the process is alive."""
        if self.proc is None or self.proc.poll() is not None:
            return False
        try:
            with urllib.request.urlopen(self.base + "/health", timeout=timeout) as r:
                return r.status == 200
        except OSError:
            return False

    def log_tail(self, n: int = 6000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-n:]
        except OSError:
            return ""

    def worker_threads(self) -> int:
        """The torch threads of the (rank-0) worker: the cores vLLM's CPU worker bound its
        OpenMP threads to, as its start-up log says."""
        m = _WORKER_CORES.search(self.log_path.read_text(errors="replace"))
        if m is None:
            raise RuntimeError("the server log does not say which cores the worker uses")
        return len([c for c in m.group(1).split(",") if c.strip()])

    def metrics_text(self) -> str:
        with urllib.request.urlopen(self.base + "/metrics", timeout=10) as r:
            return r.read().decode()

    def metrics(self) -> dict[str, float]:
        """/metrics samples summed over label sets: {name: value}."""
        return parse_metrics(self.metrics_text())

    def aborted_total(self) -> int:
        """Requests vLLM aborted because their client went away, since start (from the
        log's "Request X aborted." lines: /metrics does not count aborts; needs
        `log_requests`)."""
        if not self.config.log_requests:
            raise RuntimeError("aborts are only logged with log_requests=True")
        return len(_ABORTED.findall(self.log_path.read_text(errors="replace")))

    def post(self, path: str) -> int:
        req = urllib.request.Request(self.base + path, data=b"", method="POST")
        with urllib.request.urlopen(req, timeout=30) as r:
            return r.status

    def wait_idle(self, timeout: float = 60.0) -> dict[str, float]:
        """Metrics once no request runs or waits (raises TimeoutError if that never comes).

        vLLM publishes scheduler stats from the engine's last step; an idle engine keeps
        its last values, so a finished load is seen as soon as its last step has logged.
        """
        deadline = time.monotonic() + timeout
        while True:
            m = self.metrics()
            if m.get("vllm:num_requests_running", 1) == 0 and \
                    m.get("vllm:num_requests_waiting", 1) == 0:
                return m
            if time.monotonic() > deadline:
                raise TimeoutError(f"server not idle after {timeout:.0f} s: running "
                                   f"{m.get('vllm:num_requests_running')}, waiting "
                                   f"{m.get('vllm:num_requests_waiting')}")
            time.sleep(0.2)

    def rss_bytes(self) -> int:
        """Resident memory of the server and all its child processes."""
        return process_tree_rss(self.proc.pid) if self.proc is not None else 0


def parse_metrics(text: str, **labels: str) -> dict[str, float]:
    """Prometheus text -> {metric name: sum of its samples over label sets}; with `labels`,
    only the samples carrying those label values."""
    out: dict[str, float] = {}
    for m in _SAMPLE.finditer(text):
        if labels:
            have = dict(_LABEL.findall(m.group(2) or ""))
            if any(have.get(k) != v for k, v in labels.items()):
                continue
        out[m.group(1)] = out.get(m.group(1), 0.0) + float(m.group(3))
    return out


def process_tree_rss(pid: int) -> int:
    try:
        root = psutil.Process(pid)
        procs = [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return 0
    total = 0
    for p in procs:
        try:
            total += p.memory_info().rss
        except psutil.NoSuchProcess:
            pass
    return total
