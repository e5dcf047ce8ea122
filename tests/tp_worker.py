"""One rank of a standalone tensor-parallel engine (gloo), for test_tensor_parallel."""

from __future__ import annotations

import json
import os
import sys

import torch
import torch.distributed as dist


def run(rank: int, world: int, port: int, model_dir: str, job_file: str, out_file: str) -> None:
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        from model_executor.parallel import TensorParallel
        from vllm_elastic.core import Engine, GenerationParams

        with open(job_file) as f:
            job = json.load(f)
        engine = Engine.from_pretrained(model_dir, tp=TensorParallel.from_process_group(),
                                        max_batch_size=len(job["prompts"]),
                                        max_request_tokens=512)
        out = {}
        for fused in (False, True):  # the reference path, then the fused path's torch ops
            engine.runner.fused = fused
            for name, params in job["params"].items():
                if fused and name not in job.get("fused", ()):
                    continue
                res = engine.generate(job["prompts"], GenerationParams.from_dict(params))
                out[name + ("@fused" if fused else "")] = [r.token_ids for r in res]
        with open(f"{out_file}.{rank}", "w") as f:
            json.dump(out, f)
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    rank, world, port = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
    run(rank, world, port, *sys.argv[4:7])
