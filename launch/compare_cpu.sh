#!/usr/bin/env bash
# HTMuon vs Muon vs AdamW on the CPU demo setup: same model, data, batches, schedule and seed,
# one run after the other (about 4 minutes each on 2 cores), then a table.
#   bash launch/compare_cpu.sh [--max_steps 300 ...]
set -euo pipefail
cd "$(dirname "$0")/.."
export OMP_NUM_THREADS=1 TOKENIZERS_PARALLELISM=false
for opt in htmuon muon adamw; do
  .venv/bin/accelerate launch --config_file configs/accelerate/cpu_fsdp2.yaml launch/train.py \
    --config configs/train/tiny_cpu.yaml --optimizer "$opt" --output_dir "outputs/compare_cpu/$opt" \
    --resume never --progress_bar false "$@"
done
.venv/bin/python - <<'PY'
import json, pathlib
print(f"{'optimizer':10} {'lr':>7} {'eval ppl':>9} {'eval loss':>9} {'tokens/s':>9} {'train s':>8}")
for opt in ("htmuon", "muon", "adamw"):
    out = pathlib.Path("outputs/compare_cpu") / opt
    s = json.loads((out / "summary.json").read_text())
    lr = json.loads((out / "config.json").read_text())["train"]["lr"]
    print(f"{opt:10} {lr:>7g} {s['eval_ppl']:>9.2f} {s['eval_loss']:>9.4f} {s['tokens_per_s']:>9,.0f} {s['train_seconds']:>8.1f}")
PY
