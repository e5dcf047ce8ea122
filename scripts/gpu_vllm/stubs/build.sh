#!/usr/bin/env bash
# Local-only (no GPU here): fake libcuda.so.1 + libnvidia-ml.so.1 (one "H200", sm_90) so that
# trace_imports.py --force-cuda can load vLLM's CUDA extensions and query a device capability.
#   bash scripts/gpu_vllm/stubs/build.sh /tmp/vllm-stubs
#   LD_LIBRARY_PATH=/tmp/vllm-stubs VLLM_PLUGINS= PYTHONPATH=<site> python3.12 \
#       scripts/gpu_vllm/trace_imports.py --force-cuda --model .gpu_vllm/tinyllama --strict
set -euo pipefail
D=${1:-/tmp/vllm-stubs}; S=$(dirname "$0"); mkdir -p "$D"
gcc -shared -fPIC -o "$D/libcuda.so.1" "$S/cudastub.c"
gcc -shared -fPIC -o "$D/libnvidia-ml.so.1" "$S/nvmlstub.c"
echo "stubs in $D"
