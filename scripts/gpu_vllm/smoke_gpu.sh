#!/usr/bin/env bash
# GPU-machine smoke test of the installed bundle with a tiny random-weight Llama
# (.gpu_vllm/tinyllama, 4 MB, made by make_tiny_llama.py): the import harness,
# offline LLM.generate, and `vllm serve` answering /v1/models, /v1/chat/completions (plain
# and streaming), /v1/completions, /health and /metrics. Run from the repo root after
# install.py:   bash scripts/gpu_vllm/smoke_gpu.sh [model-dir]
# Writes its log to ${OUT:-/tmp}/smoke.log as well; exits non-zero on the first failure.
set -uo pipefail
cd "$(dirname "$0")/../.."
MODEL=${1:-.gpu_vllm/tinyllama}
LOG=${OUT:-/tmp}/smoke.log
exec > >(tee "$LOG") 2>&1
source scripts/gpu_vllm/env.sh
export VLLM_PLUGINS=${VLLM_PLUGINS-}   # vLLM alone unless the caller names plugins
fail() { echo "SMOKE FAIL: $*"; exit 1; }

echo "== 1. import harness (real CUDA platform)"
python3 scripts/gpu_vllm/trace_imports.py --model "$MODEL" --strict \
    --image-list scripts/gpu_vllm/image-pip-list.txt | grep -v "^\[ok\]   import" \
    || fail "import harness"

echo "== 2. offline LLM.generate (V1 GPUModelRunner, the class the plugin subclasses)"
VLLM_USE_V2_MODEL_RUNNER=0 python3 - "$MODEL" <<'EOF' || fail "offline generate"
import sys, time
from vllm import LLM, SamplingParams
t = time.time()
llm = LLM(model=sys.argv[1], max_model_len=512, enforce_eager=True, gpu_memory_utilization=0.3)
print("engine up in %.1f s" % (time.time() - t))
outs = llm.generate(["Hello, my name is", "2 + 3 ="], SamplingParams(max_tokens=16, temperature=0))
for o in outs:
    print(repr(o.prompt), "->", len(o.outputs[0].token_ids), "tokens", repr(o.outputs[0].text[:40]))
assert all(len(o.outputs[0].token_ids) > 0 for o in outs)
cfg = llm.llm_engine.vllm_config
print("attention backend:", getattr(getattr(cfg, "attention_config", None), "backend", "?"),
      "| V2 runner:", cfg.use_v2_model_runner)
EOF

echo "== 3. vllm serve (vLLM's default runner: V2 for this model)"
PORT=18123
vllm serve "$MODEL" --port $PORT --max-model-len 512 --enforce-eager \
    --gpu-memory-utilization 0.3 --served-model-name tiny > /tmp/serve.log 2>&1 &
SRV=$!
trap 'kill $SRV 2>/dev/null; wait $SRV 2>/dev/null' EXIT
for i in $(seq 1 180); do
    curl -sf localhost:$PORT/health >/dev/null && break
    kill -0 $SRV 2>/dev/null || { tail -60 /tmp/serve.log; fail "server died"; }
    sleep 1
done
curl -sf localhost:$PORT/health >/dev/null || { tail -60 /tmp/serve.log; fail "no /health"; }
echo "server up after ${i} s"
req() { curl -sS -o /tmp/resp -w "%{http_code}" localhost:$PORT$1 "${@:2}"; }
c=$(req /v1/models); echo "/v1/models $c $(head -c 200 /tmp/resp)"; [ "$c" = 200 ] || fail models
c=$(req /v1/chat/completions -H 'Content-Type: application/json' -d '{"model":"tiny","messages":[{"role":"user","content":"What is 2+3?"}],"max_tokens":12,"temperature":0}')
echo "/v1/chat/completions $c $(head -c 300 /tmp/resp)"; [ "$c" = 200 ] || fail chat
c=$(req /v1/chat/completions -H 'Content-Type: application/json' -d '{"model":"tiny","messages":[{"role":"user","content":"Hi"}],"max_tokens":8,"stream":true}')
echo "/v1/chat/completions stream $c: $(grep -c '^data:' /tmp/resp) data lines, last: $(tail -c 40 /tmp/resp | tr '\n' ' ')"
[ "$c" = 200 ] && grep -q 'data: \[DONE\]' /tmp/resp || fail "chat stream"
c=$(req /v1/completions -H 'Content-Type: application/json' -d '{"model":"tiny","prompt":"Once upon","max_tokens":8}')
echo "/v1/completions $c $(head -c 300 /tmp/resp)"; [ "$c" = 200 ] || fail completions
c=$(req /v1/completions -H 'Content-Type: application/json' -d '{"model":"tiny","prompt":"Once upon","max_tokens":8,"stream":true}')
echo "/v1/completions stream $c: $(grep -c '^data:' /tmp/resp) data lines"; [ "$c" = 200 ] || fail "completions stream"
c=$(req /metrics); echo "/metrics $c: $(grep -c '^vllm:' /tmp/resp) vllm: samples, e.g. $(grep -m1 '^vllm:generation_tokens_total' /tmp/resp)"
[ "$c" = 200 ] || fail metrics
grep -iE "error|traceback" /tmp/serve.log | grep -v "ERROR_LEVEL" | head -5
echo "SMOKE OK"
