#!/usr/bin/env bash
# The demo, end to end on a fresh machine: synthetic ModaNet-format data -> shards -> distributed
# training (2 CPU processes over gloo, or every GPU present) -> evaluation -> predictions.
# Everything lands under data/synth-demo, shards/demo and runs/demo (runs/demo is replaced each time).
set -euo pipefail
cd "$(dirname "$0")/.."
bash launch/setup.sh
source .venv/bin/activate

step() { printf '\n\033[1m== %s\033[0m\n' "$*"; }

step "1/5 synthetic ModaNet-format dataset (stands in for the ModaNet photos, which cannot be bundled)"
[ -f data/synth-demo/annotations.json ] ||
  modaseg-synth --out data/synth-demo --num-images 300 --width 200 --height 300 --seed 0

step "2/5 shards"
modaseg-shard --annotations data/synth-demo/annotations.json --images data/synth-demo/images \
  --out shards/demo --shard-size 25 --workers 2 --resume

step "3/5 training"
rm -rf runs/demo
if command -v nvidia-smi >/dev/null && nvidia-smi -L >/dev/null 2>&1; then
  ngpu=$(nvidia-smi -L | wc -l)
  echo "training on $ngpu GPU(s)"
  accelerate launch --multi_gpu --num_machines 1 --num_processes "$ngpu" --mixed_precision bf16 \
    --dynamo_backend no modaseg/train.py --config configs/demo.yaml "$@"
else
  echo "no GPU: training with 2 CPU processes (gloo)"
  accelerate launch --config_file launch/cpu-2proc.yaml modaseg/train.py --config configs/demo.yaml "$@"
fi

step "4/5 evaluation of the best checkpoint on the test split"
modaseg-eval --checkpoint runs/demo/best --shards shards/demo --split test --out runs/demo/eval-test \
  --workers 1

step "5/5 predictions for three of the generated images"
ls data/synth-demo/images/*.jpg | tail -n 3 | xargs modaseg-predict --checkpoint runs/demo/best --out runs/demo/predict

echo
echo "Reports:     runs/demo/eval-test/ (metrics.md, confusion.png, iou.png), runs/demo/summary.json"
echo "Predictions: runs/demo/predict/"
echo "TensorBoard: .venv/bin/tensorboard --logdir runs/demo/tensorboard"
