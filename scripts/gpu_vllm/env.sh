# Source on the GPU machine, from the repo root, after scripts/gpu_vllm/install.py:
#     source scripts/gpu_vllm/env.sh
# Puts the bundle (vLLM 0.26.0 + the packages the image lacks) and this repo on sys.path.
# PYTHONPATH entries come before the image's site-packages, but the bundle holds none of
# the image's distributions (pack.py refuses torch, triton, numpy, transformers, ...), so
# torch 2.11.0+cu130, triton, numpy and transformers still load from the image.
_vllm026_site=${VLLM026_SITE:-/opt/vllm026/site}
_vllm026_repo=$(cd "$(dirname "${BASH_SOURCE[0]:-$0}")/../.." && pwd)
export PYTHONPATH="$_vllm026_site:$_vllm026_repo${PYTHONPATH:+:$PYTHONPATH}"
export PATH="$(dirname "$_vllm026_site")/bin:$PATH"
# No network there: never try the HF hub or usage reporting.
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 VLLM_NO_USAGE_STATS=1 DO_NOT_TRACK=1
# FlashInfer is not carried (vLLM's sampler would import it in GPUModelRunner.__init__,
# V1 and V2 alike): use vLLM's own top-k/top-p sampler.
export VLLM_USE_FLASHINFER_SAMPLER=0
unset _vllm026_site _vllm026_repo
