#!/usr/bin/env python3
"""Write a tiny random-weight LlamaForCausalLM folder for smoke_gpu.sh (4 MB, bf16):
2 layers, hidden 256, 4 heads (2 KV heads, head_dim 64), vocab 1408, with the tokenizer
files (tokenizer.json, tokenizer_config.json incl. chat template, special_tokens_map.json)
copied from the mini LLaDA model. Needs torch + safetensors (any venv).

    python3 scripts/gpu_vllm/make_tiny_llama.py [--tokenizer-from ../shared/models/mini-llada-v1] [--out .gpu_vllm/tinyllama]
"""
import argparse, json, shutil
from pathlib import Path

import torch
from safetensors.torch import save_file

REPO = Path(__file__).resolve().parent.parent.parent
ap = argparse.ArgumentParser()
ap.add_argument("--tokenizer-from", default=str(REPO.parent / "shared/models/mini-llada-v1"))
ap.add_argument("--out", default=str(REPO / ".gpu_vllm/tinyllama"))
a = ap.parse_args()
out = Path(a.out)
out.mkdir(parents=True, exist_ok=True)
V, H, I, L, NH, KV = 1408, 256, 512, 2, 4, 2
D = H // NH
cfg = {
    "architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": V,
    "hidden_size": H, "intermediate_size": I, "num_hidden_layers": L,
    "num_attention_heads": NH, "num_key_value_heads": KV, "head_dim": D,
    "max_position_embeddings": 2048, "rms_norm_eps": 1e-6, "hidden_act": "silu",
    "rope_parameters": {"rope_theta": 10000.0, "rope_type": "default"},
    "bos_token_id": 1385, "eos_token_id": 1386, "pad_token_id": 1386,
    "tie_word_embeddings": False, "dtype": "bfloat16", "transformers_version": "5.17.0",
}
(out / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
(out / "generation_config.json").write_text(json.dumps(
    {"bos_token_id": 1385, "eos_token_id": 1386, "pad_token_id": 1386}) + "\n")
g = torch.Generator().manual_seed(0)
r = lambda *s: (torch.randn(*s, generator=g) * 0.02).to(torch.bfloat16)
w = {"model.embed_tokens.weight": r(V, H), "model.norm.weight": torch.ones(H, dtype=torch.bfloat16),
     "lm_head.weight": r(V, H)}
for i in range(L):
    p = f"model.layers.{i}."
    w |= {p + "input_layernorm.weight": torch.ones(H, dtype=torch.bfloat16),
          p + "post_attention_layernorm.weight": torch.ones(H, dtype=torch.bfloat16),
          p + "self_attn.q_proj.weight": r(NH * D, H), p + "self_attn.k_proj.weight": r(KV * D, H),
          p + "self_attn.v_proj.weight": r(KV * D, H), p + "self_attn.o_proj.weight": r(H, NH * D),
          p + "mlp.gate_proj.weight": r(I, H), p + "mlp.up_proj.weight": r(I, H),
          p + "mlp.down_proj.weight": r(H, I)}
save_file(w, str(out / "model.safetensors"), metadata={"format": "pt"})
for f in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
    shutil.copy(Path(a.tokenizer_from) / f, out / f)
    (out / f).chmod(0o644)
print("wrote", out)
