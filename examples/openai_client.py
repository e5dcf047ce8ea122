"""Query a vLLM server running a LLaDA checkpoint with the elastic plugin (OpenAI client).

Start the server first (see docs/serving.md), e.g.:

    VLLM_PLUGINS=elastic VLLM_CPU_KVCACHE_SPACE=4 \
        vllm serve /path/to/LLaDA-8B-Instruct --served-model-name llada \
        --additional-config '{"elastic": {"gen_length": 256, "block_length": 32}}'

then: python examples/openai_client.py [--base-url http://127.0.0.1:8000/v1]
"""

from __future__ import annotations

import argparse

from openai import OpenAI


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--base-url", default="http://127.0.0.1:8000/v1")
    ap.add_argument("--model", default="llada")
    args = ap.parse_args()
    client = OpenAI(base_url=args.base_url, api_key="none")
    messages = [{"role": "user", "content": "What is 17 * 3? Explain briefly."}]

    # Chat, Elastic-Cache with its knobs per request (vllm_xargs -> SamplingParams.extra_args).
    r = client.chat.completions.create(
        model=args.model, messages=messages, temperature=0,
        extra_body={"vllm_xargs": {"policy": "elastic", "gamma": 0.9, "beta": 16,
                                   "gen_length": 128, "block_length": 32}})
    print("chat:", r.choices[0].message.content, "|", r.choices[0].finish_reason, r.usage)

    # Streaming: each chunk is the part of the canvas that just became final.
    print("stream: ", end="")
    for chunk in client.chat.completions.create(
            model=args.model, messages=messages, temperature=0, stream=True,
            extra_body={"vllm_xargs": {"policy": "dual"}}):
        if chunk.choices:
            print(chunk.choices[0].delta.content or "", end="", flush=True)
    print()

    # Completions: note the OpenAI default max_tokens of 16 for this endpoint.
    r = client.completions.create(model=args.model, prompt="The capital of France is",
                                  max_tokens=64, temperature=0,
                                  extra_body={"vllm_xargs": {"policy": "prefix"}})
    print("completion:", r.choices[0].text, "|", r.choices[0].finish_reason)


if __name__ == "__main__":
    main()
