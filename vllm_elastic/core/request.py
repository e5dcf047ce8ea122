"""One generation request's state across denoising steps."""

from __future__ import annotations

import bisect
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from model_executor.tokenizer import SpecialIds

from .params import GenerationParams


@dataclass
class RequestStats:
    steps: int = 0
    full_steps: int = 0
    rows_computed: int = 0  # rows x layers the policy computed
    rows_full: int = 0  # rows x layers full recompute would have computed
    layers_refreshed: int = 0  # layers that recomputed every row, summed over steps
    layers_total: int = 0
    drift_events: int = 0
    speculative_rows: int = 0  # rows x layers computed and then superseded by a refresh
    tokens_committed: int = 0

    @property
    def compute_fraction(self) -> float:
        return self.rows_computed / max(1, self.rows_full)

    @property
    def layer_refresh_fraction(self) -> float:
        return self.layers_refreshed / max(1, self.layers_total)

    def as_dict(self, num_layers: int) -> dict[str, Any]:
        return {
            "steps": self.steps,
            "full_steps": self.full_steps,
            "tokens_per_step": self.tokens_committed / max(1, self.steps),
            "rows_per_layer": self.rows_computed / max(1, self.steps * num_layers),
            "compute_fraction": round(self.compute_fraction, 6),
            "layer_refresh_fraction": round(self.layer_refresh_fraction, 6),
            "drift_events": self.drift_events,
        }


@dataclass
class StepOutput:
    """What one denoising step did for one request."""

    request_id: str
    committed: list[tuple[int, int]]  # (generation offset, token id) committed this step
    new_final_tokens: list[int]  # tokens now final at the left edge (what a stream emits)
    finished: bool
    finish_reason: str | None  # "stop" (EOS / end of turn) or "length"
    stats: RequestStats | None = None  # the request's running totals (rows, refreshes, ...)


class Request:
    """Canvas, masked set, block schedule and cache-policy state of one request."""

    def __init__(self, request_id: str, prompt_ids: list[int], params: GenerationParams,
                 special: SpecialIds, device: torch.device | str = "cpu"):
        d = params.decode
        self.id = request_id
        self.params = params
        self.special = special
        self.prompt_len = len(prompt_ids)
        self.total_len = self.prompt_len + d.gen_length
        self.tokens: list[int] = list(prompt_ids) + [special.mask] * d.gen_length
        self.token_array = np.asarray(self.tokens, dtype=np.int64)  # host copy, same ids
        self.device = torch.device(device)
        self._canvas: torch.Tensor | None = None  # device copy, made when first needed
        self.masked: list[int] = list(range(self.prompt_len, self.total_len))  # sorted
        self.new_positions: list[int] = []  # committed in the previous step
        self.stop_pos: int | None = None  # first stop token committed (absolute position)
        self.num_final = 0  # generated tokens already reported final
        self.finished = False
        self.finish_reason: str | None = None
        self.step_index = 0
        self.block_index = -1
        self.block_step = 0
        self.block_schedule: list[int] = []
        self.stats = RequestStats()
        self.needs_full_pass = False  # set when the request's pages were lost (preemption)
        self.pages: list[int] = []
        self.slot_map: torch.Tensor | None = None
        self._host_slots: tuple[torch.Tensor, np.ndarray] | None = None
        self.generator: torch.Generator | None = None
        if d.temperature > 0:
            self.generator = torch.Generator(device=device).manual_seed(d.seed)
        from .policies import make_policy

        self.policy = make_policy(params.policy, self)

    @property
    def canvas(self) -> torch.Tensor:
        """The token ids on the request's device (rebuilt after commits, on demand)."""
        if self._canvas is None:
            self._canvas = torch.tensor(self.token_array, device=self.device)
        return self._canvas

    def host_slots(self, page_size: int) -> np.ndarray:
        """`slot_map` on the host (int64), from the page list it was built from."""
        if self._host_slots is None or self._host_slots[0] is not self.slot_map:
            pages = np.asarray(self.pages, dtype=np.int64)
            slots = (pages[:, None] * page_size + np.arange(page_size)).reshape(-1)
            self._host_slots = (self.slot_map, slots[:self.total_len])
        return self._host_slots[1]

    # -- schedule ----------------------------------------------------------------------------

    @property
    def gen_start(self) -> int:
        return self.prompt_len

    def block_of(self, pos: int) -> int:
        return (pos - self.prompt_len) // self.params.decode.block_length

    def block_bounds(self, b: int | None = None) -> tuple[int, int]:
        b = self.block_index if b is None else b
        bl = self.params.decode.block_length
        return self.prompt_len + b * bl, self.prompt_len + (b + 1) * bl

    def begin_step(self) -> None:
        """Advance the block pointer to the block of the leftmost masked position."""
        b = self.block_of(self.masked[0])
        if b != self.block_index:
            self.block_index, self.block_step = b, 0
            spb = self.params.decode.steps_per_block
            if spb is not None:
                lo, hi = self.block_bounds()
                n = bisect.bisect_left(self.masked, hi) - bisect.bisect_left(self.masked, lo)
                base, rem = divmod(n, spb)
                self.block_schedule = [base + (1 if i < rem else 0) for i in range(spb)]

    def candidates(self) -> list[int]:
        """Positions that may commit this step (block rule or sliding window)."""
        w = self.params.decode.window
        if w is not None:
            return self.masked[:w]
        _, hi = self.block_bounds()
        return self.masked[:bisect.bisect_left(self.masked, hi)]

    def tokens_to_commit(self) -> int | None:
        """Top-k count of LLaDA's schedule this step, or None under threshold decoding."""
        if self.params.decode.steps_per_block is None:
            return None
        i = min(self.block_step, len(self.block_schedule) - 1)
        return self.block_schedule[i]

    # -- commit ------------------------------------------------------------------------------

    def commit(self, positions: list[int], token_ids: list[int]) -> StepOutput:
        stop_ids = self.special.stop
        committed = []
        for p, t in zip(positions, token_ids):
            self.tokens[p] = t
            i = bisect.bisect_left(self.masked, p)
            del self.masked[i]
            committed.append((p - self.prompt_len, t))
            if t in stop_ids and self.params.decode.stop_at_eos and (
                    self.stop_pos is None or p < self.stop_pos):
                self.stop_pos = p
        if positions:
            self.token_array[positions] = token_ids
            self._canvas = None
        if self.stop_pos is not None:
            # Positions after the first stop token are never decoded.
            self.masked = self.masked[:bisect.bisect_right(self.masked, self.stop_pos)]
        self.new_positions = sorted(positions)
        self.stats.tokens_committed += len(positions)
        self.step_index += 1
        self.block_step += 1
        self.stats.steps += 1

        # Leftmost contiguous final prefix.
        end = self.masked[0] if self.masked else self.total_len
        if self.stop_pos is not None:
            end = min(end, self.stop_pos + 1)
        start = self.prompt_len + self.num_final
        new_final = self.tokens[start:end] if end > start else []
        self.num_final += len(new_final)
        if not self.masked:
            self.finished = True
            self.finish_reason = "stop" if self.stop_pos is not None else "length"
        return StepOutput(self.id, committed, list(new_final), self.finished,
                          self.finish_reason, self.stats)

    def output_token_ids(self) -> list[int]:
        """Generated ids up to and including the first stop token (no padding after it)."""
        gen = self.tokens[self.prompt_len:]
        stop = set(self.special.stop)
        for i, t in enumerate(gen):
            if t in stop:
                return gen[:i + 1]
        return gen
