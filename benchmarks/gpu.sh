#!/usr/bin/env bash
# gradflow's GPU figures in one run of under 9 minutes (timeouts sum to 8.8) on one H100 (no internet needed).
#   bash benchmarks/gpu.sh
# Prints: a smoke run of the real CLI on the GPU (synthetic CIFAR-format data, bf16,
# channels_last), then images/s and peak memory for resnet110/164/1001 in the modes
# baseline (DataLoader, per-image transforms, fp32), eager, bf16_cl and compiled.
# Targets: resnet164 >= 10,000 training images/s; resnet1001 fits batch 128 and runs
# 200 epochs in under 2 hours (the "200 ep (h)" column). Then the tracer's cost on the GPU
# (time and peak-memory ratios against a plain step; targets as on the CPU: <= 1.05x stats,
# <= 1.15x split, <= 1.05x memory, TensorBoard streaming <= +5%).
set -uo pipefail
cd "$(dirname "$0")/.."
python -c "import gradflow" 2>/dev/null || pip install --no-deps -q -e .
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader || true
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT

echo "== 1. smoke run of python -m gradflow train on the GPU"
python -c "from gradflow.data.cifar import synthetic_cifar; synthetic_cifar('$tmp/data', 4096, 1024)"
timeout 60 python -m gradflow train --model resnet20 --data "$tmp/data" --no-verify --smoke \
    --train-subset 4096 --stop 60 --out-dir "$tmp/runs" --run-name smoke --no-progress \
  && cat "$tmp/runs/smoke/log.csv" "$tmp/runs/smoke/status.json"

echo "== 2. throughput: baseline, eager, bf16+channels_last for all three; compiled for 110 and 164"
timeout 120 python benchmarks/train_bench.py --models resnet110,resnet164,resnet1001 \
    --modes baseline,eager,bf16_cl --workers 8 --steps 30
timeout 120 python benchmarks/train_bench.py --models resnet110,resnet164 --modes compiled --steps 40

echo "== 3. resnet1001 compiled (its compile may not finish in the time left)"
timeout 90 python benchmarks/train_bench.py --models resnet1001 --modes compiled --steps 20 \
  || echo "resnet1001 compiled: did not finish within 90 s (compile time); see bf16_cl above"

echo "== 4. tracer cost on the GPU: plain vs stats vs full split (and split + TensorBoard every step for resnet164)"
timeout 80 python benchmarks/trace_bench.py --models resnet164 resnet1001 --batch 64 --repeats 3 --device cuda \
    --tensorboard resnet164 --gc-steps 8 || echo "trace_bench: did not finish within 80 s"

echo "== 5. laptop-scale Table 2 sweep (ResNet-110 column: 5 runs x 400 iterations at batch 128, width 0.5) on the GPU"
# +100 s to the timeouts above. The same sweep on the 2-core CPU: see figures/table2_laptop_results.md.
timeout 100 python -m gradflow experiment table2 --scale laptop --rows 'resnet110-*' --data "$tmp/data" \
    --no-verify --out "$tmp/exp" --gpus 0 | grep -E "after [0-9]+s|sweep wall time|error" \
  || echo "laptop Table 2 sweep: did not finish within 100 s"

echo "== 6. exact path-length split: full spectrum and max_len=20 against a plain step, with each unit's route"
timeout 60 python benchmarks/paths_bench.py --models resnet110,resnet164 --repeats 2 --device cuda \
  || echo "paths_bench: did not finish within 60 s"

echo "== 7. trainability predictors at the paper's widths (25 Table 1/2 networks x 3 seeds) against the paper's errors"
timeout 150 python -m gradflow trainability table1 table2 --width 1 --device cuda --out "$tmp/trainability" \
    | grep -E "predictors|paper:" || echo "trainability: did not finish within 150 s"
