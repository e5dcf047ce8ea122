"""Launch geometry of the attention and probe kernels (plain numpy: no Triton needed).

A fused pass's plan (`core.fused.plan`) packs these indices for the kernels, and the
kernels' own launchers use them for ragged batches.
"""

from __future__ import annotations

import numpy as np


def attention_block_m(max_rows: int) -> int:
    """Rows per attention program: small blocks for window-only steps (more programs),
    larger ones for full passes."""
    return 16 if max_rows <= 64 else 64


def probe_block_m(max_rows: int) -> int:
    """Rows per program of the Elastic probe kernels (at most 64 probe rows a request)."""
    return 32 if max_rows <= 32 else 64


def row_blocks(row_start, block_m: int) -> tuple[np.ndarray, np.ndarray]:
    """The flat attention grid of a batch: (request, first row) of every block of
    block_m rows, request by request."""
    row_start = np.asarray(row_start, dtype=np.int64)
    nb = -(-(row_start[1:] - row_start[:-1]) // block_m)
    req = np.repeat(np.arange(nb.shape[0]), nb)
    first = np.repeat(np.cumsum(nb) - nb, nb)
    return req, row_start[req] + (np.arange(req.shape[0]) - first) * block_m
