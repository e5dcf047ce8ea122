"""Runs fused passes eagerly or as CUDA graphs, one graph per pass geometry.

A step of small batches is launch-bound: a window-only step of the 8B model issues ~15
kernels per layer, each cheaper than its launch from Python. A CUDA graph replays the
whole pass with one launch. Geometries are bucketed (`plan.bucket`), so a serving
workload sees few of them; a geometry is captured the second time it is seen (its first
run, eager, compiles its kernels and shows it is not a one-off) and replayed from then on.
All graphs share one memory pool (passes never overlap; every pass writes its results to
its own buffers, allocated outside the pool). The least recently used geometry is dropped
beyond `max_graphs`; once every graph is dropped the pool is released and the next capture
starts a new one.
"""

from __future__ import annotations

import logging
from collections import OrderedDict

import torch

from .layers import PassBuffers, run_layers
from .plan import PassGeometry

# A pass is captured only while its widest activation stays under this many bytes, which
# bounds the shared graph pool (captures reuse the pool's blocks; passes never overlap).
GRAPH_MAX_BYTES = 1 << 29

logger = logging.getLogger(__name__)


class PassExecutor:
    COUNTS = ("eager", "captured", "replayed", "capture_failed")

    def __init__(self, model, store, *, kernels: bool, graphs: bool, max_graphs: int = 48,
                 graph_max_bytes: int = GRAPH_MAX_BYTES):
        self.model = model
        self.store = store
        self.kernels = kernels
        # Under tensor parallelism the passes' all-reduces would be captured too (NCCL
        # supports it) but no multi-GPU run has checked it yet: eager there for now.
        self.graphs = graphs and model.device.type == "cuda" and not model.tp.enabled
        self.max_graphs = max_graphs
        cfg, tp = model.cfg, model.tp
        # Widest activation per row (qkv or gate/up output) bounds a graph's private memory.
        width = max(3 * cfg.d_model, 2 * cfg.mlp_hidden_size) // tp.world_size
        self.graph_max_rows = max(16, graph_max_bytes // (width * model.dtype.itemsize))
        self._bufs: OrderedDict[PassGeometry, PassBuffers] = OrderedDict()
        self._graphs: dict[PassGeometry, torch.cuda.CUDAGraph] = {}
        self._pool = None
        self.events: list | None = None  # (start, end) CUDA events per pass, when timed
        self.counts = dict.fromkeys(self.COUNTS, 0)

    def graphable(self, g: PassGeometry) -> bool:
        return self.graphs and g.T <= self.graph_max_rows

    def buffers(self, g: PassGeometry) -> PassBuffers:
        """The geometry's buffers: kept (LRU) for graph candidates, else new ones."""
        b = self._bufs.get(g)
        if b is None:
            b = PassBuffers(g, self.model.cfg.d_model, self.model.dtype, self.model.device)
            if not self.graphable(g):
                return b
            self._bufs[g] = b
            while len(self._bufs) > self.max_graphs:
                old, _ = self._bufs.popitem(last=False)
                self._graphs.pop(old, None)
            if not self._graphs:
                # The pool lives only while a graph captured into it does: capturing into
                # the id of a released pool fails inside PyTorch's allocator.
                self._pool = None
        else:
            self._bufs.move_to_end(g)
        return b

    def _capture(self, bufs: PassBuffers) -> "torch.cuda.CUDAGraph | None":
        """Capture the pass as a graph; if PyTorch refuses the capture, log it and run this
        executor eagerly from then on (same results, launch-bound)."""
        graph = torch.cuda.CUDAGraph()
        try:
            with torch.cuda.graph(graph, pool=self._pool):
                run_layers(self.model, self.store, bufs, self.kernels)
        except RuntimeError as e:
            logger.warning("CUDA graph capture failed (%s); fused passes run eagerly from "
                           "now on", str(e).splitlines()[0][:300])
            self.graphs = False
            self.counts["capture_failed"] += 1
            return None
        if self._pool is None:
            self._pool = graph.pool()
        self._graphs[bufs.geometry] = graph
        self.counts["captured"] += 1
        return graph

    def launch(self, bufs: PassBuffers) -> None:
        """Run the pass whose indices were uploaded into `bufs` (and h_in filled)."""
        g = bufs.geometry
        graph = self._graphs.get(g)
        if graph is None and bufs.runs >= 1 and self.graphable(g):
            graph = self._capture(bufs)
        timed = self.events is not None and bufs.h_out.is_cuda
        if timed:  # after a capture: the device time of the pass alone
            start = torch.cuda.Event(enable_timing=True)
            start.record()
        if graph is not None:
            graph.replay()
            self.counts["replayed"] += 1
        else:
            run_layers(self.model, self.store, bufs, self.kernels)
            self.counts["eager"] += 1
        if timed:
            end = torch.cuda.Event(enable_timing=True)
            end.record()
            self.events.append((start, end))
        bufs.runs += 1
        bufs.download()
