"""Two replicas of the LLaDA vLLM engine behind one Ray Serve HTTP route.

    VLLM_CPU_KVCACHE_SPACE=1 python examples/ray_serve_replicas.py ../shared/models/mini-llada-v1

then POST OpenAI-style requests to http://127.0.0.1:8000/v1/chat/completions. On GPUs give
each replica `ray_actor_options={"num_gpus": N}` and `tensor_parallel_size=N` in the engine
arguments; for load-based scaling pass `autoscaling_config` (min/max replicas,
target_ongoing_requests) instead of `num_replicas`.
"""

import sys
import time

import ray
from ray import serve

from vllm_elastic.serving.ray_serve import build_app

if __name__ == "__main__":
    model = sys.argv[1] if len(sys.argv) > 1 else "../shared/models/mini-llada-v1"
    ray.init()
    serve.run(build_app(model, num_replicas=2, engine_args={
        "dtype": "float32", "max_model_len": 1024, "block_size": 32,
        "additional_config": {"elastic": {"policy": "elastic", "gen_length": 128}}}),
        route_prefix="/")
    print("serving on http://127.0.0.1:8000 (Ctrl-C to stop)")
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        serve.shutdown()
