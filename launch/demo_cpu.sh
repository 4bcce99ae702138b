#!/usr/bin/env bash
# The CPU demo in one command, from a fresh clone:
#   bash launch/demo_cpu.sh [--option value ...]
# 1. creates .venv (CPU-only torch pinned first: a bare "torch" would pull a multi-GB CUDA build;
#    elsewhere set TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu),
# 2. trains the tiny LLaMA (~1.9M params) on the offline corpus (stdlib docstrings, built and
#    cached on first use) with HTMuon on 2 CPU processes under FSDP2 for 240 steps,
# 3. prints the progress bar, the final eval perplexity, and writes outputs/tiny_cpu/
#    {metrics.jsonl, loss.png, final_model/ (safetensors), checkpoints/}.
# Extra options go to the trainer, e.g. --optimizer muon --output_dir outputs/tiny_muon.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
if ! .venv/bin/python -c "import htmuon_dist, matplotlib, accelerate" 2>/dev/null; then
  .venv/bin/python -m pip install -q ${TORCH_INDEX_URL:+--index-url "$TORCH_INDEX_URL"} "torch==${TORCH_VERSION:-2.13.0}"
  .venv/bin/python -m pip install -q -e . matplotlib
fi
export OMP_NUM_THREADS=1 TOKENIZERS_PARALLELISM=false
exec .venv/bin/accelerate launch --config_file configs/accelerate/cpu_fsdp2.yaml \
  launch/train.py --config configs/train/tiny_cpu.yaml "$@"
