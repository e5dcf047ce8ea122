"""Hugging Face config class for `model_type: llada` (no trust_remote_code needed)."""

from __future__ import annotations

from transformers import PretrainedConfig


class LLaDAConfig(PretrainedConfig):
    """LLaDA's config.json as vLLM reads it (standard names mapped onto LLaDA's own)."""

    model_type = "llada"
    attribute_map = {
        "hidden_size": "d_model",
        "num_attention_heads": "n_heads",
        "num_hidden_layers": "n_layers",
        "num_key_value_heads": "n_kv_heads",
        "max_position_embeddings": "max_sequence_length",
        "intermediate_size": "mlp_hidden_size",
    }

    def __init__(self, d_model: int = 4096, n_heads: int = 32, n_kv_heads: int | None = None,
                 n_layers: int = 32, mlp_hidden_size: int = 12288,
                 max_sequence_length: int = 4096, vocab_size: int = 126464,
                 embedding_size: int | None = None, mask_token_id: int = 126336,
                 rope_theta: float = 500000.0, rms_norm_eps: float = 1e-5,
                 weight_tying: bool = False, **kwargs):
        self.d_model = d_model
        self.n_heads = n_heads
        self.n_kv_heads = n_kv_heads if n_kv_heads is not None else n_heads
        self.n_layers = n_layers
        self.mlp_hidden_size = mlp_hidden_size
        self.max_sequence_length = max_sequence_length
        self.vocab_size = vocab_size
        self.embedding_size = embedding_size or vocab_size
        self.mask_token_id = mask_token_id
        self.rope_theta = rope_theta
        self.rms_norm_eps = rms_norm_eps
        self.weight_tying = weight_tying
        # LLaDA has no notion of a canvas length in vLLM's sense: never set `canvas_length`
        # here (vLLM's V1 runner refuses models it marks as diffusion models).
        kwargs.setdefault("tie_word_embeddings", weight_tying)
        super().__init__(**kwargs)
