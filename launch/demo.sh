#!/usr/bin/env bash
# The demo, end to end on a fresh machine: synthetic ModaNet-format data -> shards -> distributed
# training (2 CPU processes over gloo, or every GPU present) -> evaluation -> predictions.
# Everything lands under data/synth-demo, shards/demo and runs/demo (runs/demo is replaced each time).
set -euo pipefail
cd "$(dirname "$0")/.."
bash launch/setup.sh
source .venv/bin/activate
started=$SECONDS  # the demo's own time, after the one-time set-up of .venv

step() { printf '\n\033[1m== %s\033[0m\n' "$*"; }

step "1/5 synthetic ModaNet-format dataset (stands in for the ModaNet photos, which cannot be bundled)"
[ -f data/synth-demo/annotations.json ] ||
  modaseg-synth --out data/synth-demo --num-images 300 --width 200 --height 300 --seed 0

step "2/5 shards"
modaseg-shard --annotations data/synth-demo/annotations.json --images data/synth-demo/images \
  --out shards/demo --shard-size 25 --workers 2 --resume

step "3/5 training"
rm -rf runs/demo
# The GPUs torch can use: CUDA_VISIBLE_DEVICES respected, and no count of the extra lines `nvidia-smi -L`
# prints for MIG instances. The precision comes from the config (optim.mixed_precision=auto: bf16 where
# native, fp16 on older GPUs), so the launcher is told `no`; train.device=cuda makes a GPU that cannot
# be used an error rather than a CPU run.
ngpu=$(python -c "import torch; print(torch.cuda.device_count() if torch.cuda.is_available() else 0)" 2>/dev/null || echo 0)
if [ "$ngpu" -gt 1 ]; then
  echo "training on $ngpu GPUs (DDP over NCCL)"
  accelerate launch --config_file launch/gpu-8.yaml --multi_gpu --num_machines 1 --num_processes "$ngpu" \
    --mixed_precision no --dynamo_backend no modaseg/train.py --config configs/demo.yaml train.device=cuda "$@"
elif [ "$ngpu" -eq 1 ]; then
  # one process: no --multi_gpu (accelerate refuses it with one process); --gpu_ids all keeps the
  # caller's CUDA_VISIBLE_DEVICES instead of the config's GPU 0
  echo "training on 1 GPU"
  accelerate launch --config_file launch/gpu-1.yaml --gpu_ids all --num_machines 1 --num_processes 1 \
    --mixed_precision no --dynamo_backend no modaseg/train.py --config configs/demo.yaml train.device=cuda "$@"
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
echo "Demo finished in $(((SECONDS - started) / 60)) min $(((SECONDS - started) % 60)) s."
echo "Reports:     runs/demo/eval-test/ (metrics.md, confusion.png, iou.png), runs/demo/summary.json"
echo "Predictions: runs/demo/predict/"
echo "TensorBoard: .venv/bin/tensorboard --logdir runs/demo/tensorboard"
