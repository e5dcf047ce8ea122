"""Offline batch generation with vLLM's `LLM` on a LLaDA checkpoint (elastic plugin).

    VLLM_PLUGINS=elastic python examples/offline_generate.py /path/to/LLaDA-folder

vLLM's `LLM` starts worker processes, hence the `if __name__ == "__main__":` guard.
"""

from __future__ import annotations

import sys

if __name__ == "__main__":
    from vllm import LLM, SamplingParams

    folder = sys.argv[1]
    llm = LLM(model=folder,
              # KV space on CPU: a fraction of memory or kv_cache_memory_bytes.
              kv_cache_memory_bytes=2 * 2 ** 30,
              # Server-wide defaults for every request (same keys as vllm_xargs).
              additional_config={"elastic": {"gen_length": 128, "block_length": 32,
                                             "policy": "elastic"}})
    conversations = [[{"role": "user", "content": q}] for q in (
        "What is 12 + 30?", "Name three primary colours.", "Write a haiku about rain.")]
    per_request = [
        SamplingParams(temperature=0, max_tokens=128),  # server defaults (elastic)
        SamplingParams(temperature=0, max_tokens=128, extra_args={"policy": "dual"}),
        SamplingParams(temperature=0.5, seed=1, max_tokens=128,
                       extra_args={"policy": "spa", "threshold": 0.8}),
    ]
    for conv, sp in zip(conversations, per_request):
        out = llm.chat(conv, sp, use_tqdm=False)[0].outputs[0]
        print(repr(out.text), out.finish_reason, len(out.token_ids))
