#!/usr/bin/env bash
# The LC-Net runs behind the LC-Net sections of docs/results.md and docs/benchmarks.md (measured on a shared 2-core CPU,
# one thread per process). Output: benchmarks/results/lc_*.{txt,json}, lcnet_fmnist_*.
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p benchmarks/results
export OMP_NUM_THREADS=1
.venv/bin/dsnet train lcnet --config configs/lcnet_fashion_mnist.yaml --out runs/lcnet_fmnist
cp runs/lcnet_fmnist/metrics.jsonl benchmarks/results/lcnet_fmnist_train_metrics.jsonl
cp runs/lcnet_fmnist/summary.json benchmarks/results/lcnet_fmnist_train_summary.json
.venv/bin/python benchmarks/lcnet_real_images.py runs/lcnet_fmnist/best.ckpt \
    --json benchmarks/results/lcnet_fmnist_real_images.json
.venv/bin/dsnet bench --checkpoint runs/lcnet_fmnist/best.ckpt --batch-sizes 1,32 --threads 1 \
    --json benchmarks/results/lc_resnet8_tiny_fmnist.json 2>/dev/null | tee benchmarks/results/lc_resnet8_tiny_fmnist.txt
.venv/bin/dsnet bench --model lc_resnet20_cifar --batch-sizes 1,32 --threads 1 \
    --json benchmarks/results/lc_resnet20_cifar.json 2>/dev/null | tee benchmarks/results/lc_resnet20_cifar.txt
.venv/bin/dsnet bench --model lc_resnet50 --input-size 112 --batch-sizes 1,32 --threads 1 --densities 0.5 \
    --skip-fractions 0.5 --repeats 5 --warmup 1 \
    --json benchmarks/results/lc_resnet50_112px.json 2>/dev/null | tee benchmarks/results/lc_resnet50_112px.txt
