#!/usr/bin/env bash
# Sequence SFT of SmolLM2 on the *whole* llara training set of ML-100K (one epoch over every window of every
# user's training history), then S-DPO K=3 from it, each evaluated on *every* llara test row (9,905) with the
# shared 20-candidate lists; written as one quality-results file. Meant for one GPU (bf16): about 4,200
# documents x ~250 tokens per epoch and ~10k test prompts, a few minutes on an H200.
#
#   bash benchmarks/gpu_full.sh [OUT_DIR] [RESULT_JSON]     (defaults: runs/gpu_full results/gpu_full_ml100k.json)
#
# Environment (all optional):
#   RECALIGN   the recalign executable (default: .venv/bin/recalign if present, else recalign)
#   MODEL      base model (default smollm2; a GPU machine without the `gguf` package needs the safetensors
#              cache made on a CPU machine first: RECALIGN_CACHE, see the README)
#   DTYPE      base weights (default bfloat16)
#   SFT_ARGS / ALIGN_ARGS   extra dotted overrides, e.g. for a tiny CPU dry run (tests/test_gpu_script.py)
# Re-running continues from the last checkpoints (--resume).
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-runs/gpu_full}
RESULT=${2:-results/gpu_full_ml100k.json}
if [ -z "${RECALIGN:-}" ]; then
  if [ -x .venv/bin/recalign ]; then RECALIGN=.venv/bin/recalign; else RECALIGN=recalign; fi
fi
MODEL=${MODEL:-smollm2}
DTYPE=${DTYPE:-bfloat16}
export HF_HUB_OFFLINE=1
start=$(date +%s)

# shellcheck disable=SC2086
"$RECALIGN" sft --config configs/sft_sequence_ml100k.yaml --output "$OUT/sft" --resume \
  model="$MODEL" dtype="$DTYPE" threads=0 n_train=0 \
  training.max_steps=-1 training.epochs=1 training.batch_size=32 training.learning_rate=0.001 \
  training.warmup_steps=10 training.save_steps=50 training.logging_steps=10 \
  eval.n_test=-1 eval.batch_size=64 ${SFT_ARGS:-}

# shellcheck disable=SC2086
"$RECALIGN" align --model "$OUT/sft" --loss sdpo --negatives 3 --output "$OUT/sdpo" --resume \
  dtype="$DTYPE" threads=0 method=sdpo-k3-sequence n_train=8192 max_history=20 beta=1.0 \
  lora.r=16 lora.alpha=32 'lora.target_modules=[q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj]' \
  training.max_steps=-1 training.epochs=1 training.batch_size=32 training.learning_rate=0.0005 \
  training.warmup_steps=5 training.save_steps=50 eval.n_test=-1 eval.protocols=[candidates] \
  eval.batch_size=64 ${ALIGN_ARGS:-}

PYTHON=$(dirname "$(command -v "$RECALIGN")")/python
[ -x "$PYTHON" ] || PYTHON=python3
"$PYTHON" - "$OUT" "$RESULT" "$(( $(date +%s) - start ))" <<'PY'
import json, sys
from pathlib import Path
out, result, seconds = Path(sys.argv[1]), Path(sys.argv[2]), int(sys.argv[3])
records = []
for stage in ("sft", "sdpo"):
    records += json.loads((out / stage / "records.json").read_text())["records"]
result.parent.mkdir(parents=True, exist_ok=True)
result.write_text(json.dumps({"records": records, "command": "bash benchmarks/gpu_full.sh " + " ".join(sys.argv[1:3]),
                              "wall_seconds": seconds}, indent=2) + "\n")
print(f"wrote {result} ({len(records)} records, {seconds} s)")
PY
