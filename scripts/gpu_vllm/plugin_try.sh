#!/usr/bin/env bash
# Try the vllm-elastic plugin on the installed vLLM 0.26 bundle (GPU machine, repo root):
#   bash scripts/gpu_vllm/plugin_try.sh <LLaDA folder>
# 1. offline LLM(model=...).generate, 2. `vllm serve` + one chat completion. Log: $OUT/plugin.log
set -uo pipefail
cd "$(dirname "$0")/../.."
M=${1:?model folder}
exec > >(tee "${OUT:-/tmp}/plugin.log") 2>&1
source scripts/gpu_vllm/env.sh
[ -n "${EXTRA_PYTHONPATH:-}" ] && export PYTHONPATH="$EXTRA_PYTHONPATH:$PYTHONPATH"
export VLLM_PLUGINS=elastic
echo "== offline"
timeout 240 python3 - "$M" <<'PY'
import sys
from vllm import LLM, SamplingParams
llm = LLM(model=sys.argv[1], dtype="bfloat16", max_model_len=1024, gpu_memory_utilization=0.3)
o = llm.generate(["2 + 3 ="], SamplingParams(max_tokens=32, temperature=0))
print("OFFLINE OK:", repr(o[0].outputs[0].text[:80]))
PY
echo "offline rc=$?"
echo "== serve"
timeout 200 vllm serve "$M" --port 18124 --max-model-len 1024 --gpu-memory-utilization 0.3 \
    --served-model-name llada > /tmp/pserve.log 2>&1 &
S=$!
for i in $(seq 1 150); do curl -sf localhost:18124/health >/dev/null && break; kill -0 $S 2>/dev/null || break; sleep 1; done
curl -sS -m 60 localhost:18124/v1/chat/completions -H 'Content-Type: application/json' \
  -d '{"model":"llada","messages":[{"role":"user","content":"What is 2+3?"}],"max_tokens":32}' ; echo
curl -sS -m 10 localhost:18124/metrics | grep -m3 "^vllm_elastic" ; echo
kill $S 2>/dev/null; wait $S 2>/dev/null
grep -E "Error|error|Traceback" /tmp/pserve.log | head -20
tail -40 /tmp/pserve.log
