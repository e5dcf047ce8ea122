"""An independent, straightforward LLaDA written from the published formulas, for tests.

Dense, one sequence at a time, no cache, nothing shared with the engine's code: the model
reads the safetensors itself; `generate` follows LLaDA's reference decoding (top-k
schedule with low-confidence remasking) and Fast-dLLM's threshold rule.
"""

from __future__ import annotations

import json
import math
import os

import torch
from safetensors import safe_open


class ReferenceLLaDA:
    def __init__(self, folder: str):
        with open(os.path.join(folder, "config.json")) as f:
            self.cfg = json.load(f)
        with open(os.path.join(folder, "model.safetensors.index.json")) as f:
            wmap = json.load(f)["weight_map"]
        self.w = {}
        for name, shard in wmap.items():
            with safe_open(os.path.join(folder, shard), framework="pt") as f:
                self.w[name] = f.get_tensor(name).float()
        self.mask_id = self.cfg["mask_token_id"]

    def _norm(self, x, w):
        return w * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.cfg["rms_norm_eps"]))

    @torch.no_grad()
    def logits(self, ids: torch.Tensor) -> torch.Tensor:
        c, w = self.cfg, self.w
        T, d, nh = ids.shape[0], c["d_model"], c["n_heads"]
        hd = d // nh
        x = w["model.transformer.wte.weight"][ids]
        inv = 1.0 / (c["rope_theta"] ** (torch.arange(0, hd, 2).float() / hd))
        ang = torch.arange(T).float()[:, None] * inv[None, :]
        cos, sin = torch.cat([ang, ang], -1).cos(), torch.cat([ang, ang], -1).sin()

        def rope(t):  # t: [nh, T, hd]
            rot = torch.cat([-t[..., hd // 2:], t[..., :hd // 2]], -1)
            return t * cos + rot * sin

        for i in range(c["n_layers"]):
            p = f"model.transformer.blocks.{i}."
            h = self._norm(x, w[p + "attn_norm.weight"])
            q = (h @ w[p + "q_proj.weight"].T).view(T, nh, hd).transpose(0, 1)
            k = (h @ w[p + "k_proj.weight"].T).view(T, nh, hd).transpose(0, 1)
            v = (h @ w[p + "v_proj.weight"].T).view(T, nh, hd).transpose(0, 1)
            q, k = rope(q), rope(k)
            att = torch.softmax(q @ k.transpose(1, 2) / math.sqrt(hd), dim=-1)  # bidirectional
            o = (att @ v).transpose(0, 1).reshape(T, d)
            x = x + o @ w[p + "attn_out.weight"].T
            h = self._norm(x, w[p + "ff_norm.weight"])
            g = h @ w[p + "ff_proj.weight"].T
            u = h @ w[p + "up_proj.weight"].T
            x = x + (torch.nn.functional.silu(g) * u) @ w[p + "ff_out.weight"].T
        x = self._norm(x, w["model.transformer.ln_f.weight"])
        return x @ w["model.transformer.ff_out.weight"].T


def num_transfer_tokens(n_masked: int, steps: int) -> list[int]:
    base, rem = divmod(n_masked, steps)
    return [base + (1 if i < rem else 0) for i in range(steps)]


@torch.no_grad()
def generate(logits_fn, prompt: list[int], mask_id: int, gen_length: int, block_length: int,
             steps: int | None = None, threshold: float | None = None) -> list[int]:
    """LLaDA generate() (top-k schedule) or, with `threshold`, Fast-dLLM's threshold rule;
    temperature 0, no cache. Returns the generated ids (all G of them)."""
    P = len(prompt)
    x = torch.tensor(prompt + [mask_id] * gen_length)
    n_blocks = gen_length // block_length
    for b in range(n_blocks):
        lo, hi = P + b * block_length, P + (b + 1) * block_length
        if steps is not None:
            spb = steps // n_blocks
            schedule = num_transfer_tokens(int((x[lo:hi] == mask_id).sum()), spb)
        i = 0
        while (x[lo:hi] == mask_id).any():
            mask_index = x == mask_id
            logits = logits_fn(x)
            x0 = logits.argmax(-1)
            p = torch.softmax(logits.double(), -1)
            x0_p = p.gather(-1, x0[:, None]).squeeze(-1)
            x0_p[hi:] = -math.inf
            conf = torch.where(mask_index, x0_p, torch.tensor(-math.inf, dtype=torch.float64))
            if steps is not None:
                k = schedule[i]
                sel = torch.topk(conf, k).indices.tolist() if k > 0 else []
            else:
                order = torch.argsort(conf, descending=True, stable=True).tolist()
                sel = [order[0]] + [j for j in order[1:] if conf[j] >= threshold]
            for j in sel:
                x[j] = x0[j]
            i += 1
            if steps is not None and i >= len(schedule):
                break
    return x[P:].tolist()
