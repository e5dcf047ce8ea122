"""The LLaDA masked-diffusion transformer in plain torch, tensor-parallel ready.

The model exposes its computation one layer at a time, on arbitrary rows: a cache policy
decides which positions each layer recomputes, the step runner gathers those rows from
every request of a batch, and the layer computes exactly those rows. Attention itself lives
with the KV store (`vllm_elastic.core.attention`), because it reads the request's pages.

Tensor parallelism (Megatron style): q/k/v and the MLP's gate/up projections are split by
output rows (attention heads / MLP columns), `attn_out` and the MLP's down projection by
input columns followed by one all-reduce each (one per block half), the embedding and the
LM head by vocabulary rows.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .checkpoint import PREFIX, CheckpointReader, check_folder
from .config import LLaDAConfig
from .layers import RotaryEmbedding, linear, rms_norm
from .parallel import TensorParallel


class LLaDALayer:
    """One pre-norm transformer block. Weights are this rank's shards, fused per GEMM."""

    def __init__(self, cfg: LLaDAConfig, tp: TensorParallel, weights: dict[str, torch.Tensor]):
        self.cfg = cfg
        self.tp = tp
        self.n_heads = cfg.n_heads // tp.world_size
        self.head_dim = cfg.head_dim
        self.attn_norm = weights["attn_norm"]
        self.w_qkv = weights["qkv"]  # [3 * heads_local * head_dim, d_model]
        self.w_o = weights["attn_out"]  # [d_model, heads_local * head_dim]
        self.ff_norm = weights["ff_norm"]
        self.w_gate_up = weights["gate_up"]  # [2 * mlp_local, d_model]
        self.w_down = weights["ff_out"]  # [d_model, mlp_local]

    @property
    def w_v(self) -> torch.Tensor:
        """This rank's rows of v_proj ([heads_local * head_dim, d_model])."""
        n = self.n_heads * self.head_dim
        return self.w_qkv[2 * n:]

    def qkv(self, h: torch.Tensor, positions: torch.Tensor, rope: RotaryEmbedding
            ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Rows' post-RoPE q, k and v, each [rows, heads_local, head_dim]."""
        x = rms_norm(h, self.attn_norm, self.cfg.rms_norm_eps)
        qkv = linear(x, self.w_qkv).view(h.shape[0], 3, self.n_heads, self.head_dim)
        q, k, v = qkv.unbind(1)
        return rope.apply(q, positions), rope.apply(k, positions), v

    def query(self, h: torch.Tensor, positions: torch.Tensor, rope: RotaryEmbedding
              ) -> torch.Tensor:
        """Rows' post-RoPE q only (for recomputing a cached query from a cached layer input)."""
        x = rms_norm(h, self.attn_norm, self.cfg.rms_norm_eps)
        n = self.n_heads * self.head_dim
        q = linear(x, self.w_qkv[:n]).view(h.shape[0], self.n_heads, self.head_dim)
        return rope.apply(q, positions)

    def finish(self, h: torch.Tensor, attn: torch.Tensor) -> torch.Tensor:
        """Residual attention output, then the gated MLP: the rows' layer output."""
        o = linear(attn.reshape(h.shape[0], -1), self.w_o)
        h = h + self.tp.all_reduce(o)
        x = rms_norm(h, self.ff_norm, self.cfg.rms_norm_eps)
        gate, up = linear(x, self.w_gate_up).chunk(2, dim=-1)
        down = linear(F.silu(gate) * up, self.w_down)
        return h + self.tp.all_reduce(down)


class LLaDAModel:
    """Embedding, blocks and head of a LLaDA checkpoint (one tensor-parallel shard of it)."""

    def __init__(self, cfg: LLaDAConfig, layers: list[LLaDALayer], wte: torch.Tensor,
                 ln_f: torch.Tensor, head: torch.Tensor, tp: TensorParallel):
        self.cfg = cfg
        self.layers = layers
        self.wte = wte  # [embedding_size / tp, d_model]
        self.ln_f = ln_f
        self.head = head  # [embedding_size / tp, d_model]
        self.tp = tp
        self.vocab_start = tp.rank * wte.shape[0]
        self.rope = RotaryEmbedding(cfg.head_dim, cfg.rope_theta, cfg.max_sequence_length,
                                    wte.device)

    # -- construction ---------------------------------------------------------------------

    @classmethod
    def from_pretrained(cls, folder: str, dtype: torch.dtype = torch.float32,
                        device: str | torch.device = "cpu",
                        tp: TensorParallel | None = None) -> "LLaDAModel":
        cfg = check_folder(folder, need_tokenizer=False)
        tp = tp or TensorParallel()
        (a0, a1), (m0, m1), (v0, v1) = _shard_ranges(cfg, tp)

        def put(t: torch.Tensor) -> torch.Tensor:
            return t.to(device=device, dtype=dtype).contiguous()

        with CheckpointReader(folder) as ck:
            ck.check_shapes(cfg)
            layers = []
            for i in range(cfg.n_layers):
                b = f"{PREFIX}blocks.{i}."
                w = {
                    "attn_norm": put(ck.read(b + "attn_norm.weight")),
                    "qkv": put(torch.cat([ck.read(b + f"{p}.weight", 0, a0, a1)
                                          for p in ("q_proj", "k_proj", "v_proj")])),
                    "attn_out": put(ck.read(b + "attn_out.weight", 1, a0, a1)),
                    "ff_norm": put(ck.read(b + "ff_norm.weight")),
                    "gate_up": put(torch.cat([ck.read(b + "ff_proj.weight", 0, m0, m1),
                                              ck.read(b + "up_proj.weight", 0, m0, m1)])),
                    "ff_out": put(ck.read(b + "ff_out.weight", 1, m0, m1)),
                }
                layers.append(LLaDALayer(cfg, tp, w))
            wte = put(ck.read(PREFIX + "wte.weight", 0, v0, v1))
            head_name = PREFIX + ("wte.weight" if cfg.weight_tying else "ff_out.weight")
            head = put(ck.read(head_name, 0, v0, v1))
            ln_f = put(ck.read(PREFIX + "ln_f.weight"))
        return cls(cfg, layers, wte, ln_f, head, tp)

    @classmethod
    def random(cls, cfg: LLaDAConfig, dtype: torch.dtype = torch.bfloat16,
               device: str | torch.device = "cpu", tp: TensorParallel | None = None,
               seed: int = 0, std: float = 0.02) -> "LLaDAModel":
        """Random weights built in place (speed measurements at real shapes).

        Every full tensor is drawn from its own seeded generator and then sharded, so any
        tensor-parallel size holds slices of the same model."""
        tp = tp or TensorParallel()
        d = cfg.d_model
        (a0, a1), (m0, m1), (v0, v1) = _shard_ranges(cfg, tp)
        counter = iter(range(1 << 30))

        def rnd(rows: int, cols: int, r: tuple[int, int] | None = None,
                c: tuple[int, int] | None = None) -> torch.Tensor:
            g = torch.Generator(device=device).manual_seed(seed * 1_000_003 + next(counter))
            w = torch.randn(rows, cols, generator=g, device=device, dtype=torch.float32)
            if r is not None:
                w = w[r[0]:r[1]]
            if c is not None:
                w = w[:, c[0]:c[1]]
            return (w * std).to(dtype).contiguous()

        def ones() -> torch.Tensor:
            return torch.ones(d, device=device, dtype=dtype)

        layers = []
        for _ in range(cfg.n_layers):
            qkv = torch.cat([rnd(d, d, (a0, a1)) for _ in range(3)])
            attn_out = rnd(d, d, c=(a0, a1))
            gate_up = torch.cat([rnd(cfg.mlp_hidden_size, d, (m0, m1)) for _ in range(2)])
            ff_out = rnd(d, cfg.mlp_hidden_size, c=(m0, m1))
            layers.append(LLaDALayer(cfg, tp, {
                "attn_norm": ones(), "qkv": qkv, "attn_out": attn_out,
                "ff_norm": ones(), "gate_up": gate_up, "ff_out": ff_out}))
        wte = rnd(cfg.embedding_size, d, (v0, v1))
        head = rnd(cfg.embedding_size, d, (v0, v1))
        return cls(cfg, layers, wte, ones(), head, tp)

    # -- computation ----------------------------------------------------------------------

    @property
    def device(self) -> torch.device:
        return self.wte.device

    @property
    def dtype(self) -> torch.dtype:
        return self.wte.dtype

    def embed(self, token_ids: torch.Tensor) -> torch.Tensor:
        if not self.tp.enabled:
            return F.embedding(token_ids, self.wte)
        local = token_ids - self.vocab_start
        inside = (local >= 0) & (local < self.wte.shape[0])
        out = F.embedding(local.clamp(0, self.wte.shape[0] - 1), self.wte)
        out = out * inside.unsqueeze(-1).to(out.dtype)
        return self.tp.all_reduce(out)

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        """Final norm and LM head: [rows, embedding_size] (gathered over ranks)."""
        x = rms_norm(h, self.ln_f, self.cfg.rms_norm_eps)
        out = linear(x, self.head)
        if self.cfg.scale_logits:
            out = out * (1.0 / math.sqrt(self.cfg.d_model))
        return self.tp.all_gather_last(out)

    def forward(self, token_ids: torch.Tensor) -> torch.Tensor:
        """Dense full forward of one sequence ([T] ids) to logits [T, vocab]; no cache."""
        positions = torch.arange(token_ids.shape[0], device=token_ids.device)
        h = self.embed(token_ids)
        scale = 1.0 / math.sqrt(self.cfg.head_dim)
        for layer in self.layers:
            q, k, v = layer.qkv(h, positions, self.rope)
            attn = F.scaled_dot_product_attention(
                q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1), scale=scale
            ).transpose(0, 1)
            h = layer.finish(h, attn)
        return self.logits(h)


def _shard_ranges(cfg: LLaDAConfig, tp: TensorParallel
                  ) -> tuple[tuple[int, int], tuple[int, int], tuple[int, int]]:
    """This rank's [start, end) of the attention width, the MLP width and the vocabulary."""
    h0, h1 = tp.shard(cfg.n_heads, "n_heads")
    return ((h0 * cfg.head_dim, h1 * cfg.head_dim),
            tp.shard(cfg.mlp_hidden_size, "mlp_hidden_size"),
            tp.shard(cfg.embedding_size, "embedding_size"))
