"""The engine core split over two processes (gloo) gives the tokens of one process, on the
reference path and on the fused path (whose Elastic drift sums are all-reduced over the
ranks' heads before the cosine)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

from vllm_elastic.core import GenerationParams

PARAMS = {
    "none": {"policy": "none", "gen_length": 64, "block_length": 32, "threshold": 0.9},
    "elastic": {"policy": "elastic", "gen_length": 64, "block_length": 32, "threshold": 0.9},
}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_core_tp2_matches_tp1(engine, model_dir, dev_prompts, tmp_path):
    prompts = dev_prompts[:20]
    job = tmp_path / "job.json"
    # The fused path for elastic, whose drift sums are the part that is tensor parallel.
    job.write_text(json.dumps({"prompts": prompts, "params": PARAMS, "fused": ["elastic"]}))
    out = tmp_path / "out.json"
    port = str(_free_port())
    root = Path(__file__).resolve().parent.parent
    env = {**os.environ, "PYTHONPATH": str(root), "OMP_NUM_THREADS": "1"}
    procs = [subprocess.Popen([sys.executable, "-m", "tests.tp_worker", str(r), "2", port,
                               model_dir, str(job), str(out)], cwd=root, env=env)
             for r in range(2)]
    for p in procs:
        assert p.wait(timeout=900) == 0
    ranks = [json.loads(Path(f"{out}.{r}").read_text()) for r in range(2)]
    assert ranks[0] == ranks[1], "ranks disagree"
    for name, params in PARAMS.items():
        single = [r.token_ids for r in engine.generate(prompts, GenerationParams.from_dict(params))]
        for path in [p for p in (name, name + "@fused") if p in ranks[0]]:
            same = sum(a == b for a, b in zip(single, ranks[0][path]))
            assert same == len(prompts), f"{path}: {same}/{len(prompts)} equal"
