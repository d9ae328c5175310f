#!/usr/bin/env bash
# The runs behind docs/benchmarks.md (2-core CPU; a few minutes each). Output: benchmarks/results/<model>.{txt,json}
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p benchmarks/results
.venv/bin/dsnet bench --model ds_mobilenet_v1 --batch-sizes 1,32 --threads 2 --repeats 7 --warmup 1 --onnx \
    --json benchmarks/results/ds_mobilenet_v1.json 2>/dev/null | tee benchmarks/results/ds_mobilenet_v1.txt
.venv/bin/dsnet bench --model ds_resnet50 --batch-sizes 1,32 --threads 2 --repeats 5 --warmup 1 \
    --json benchmarks/results/ds_resnet50.json 2>/dev/null | tee benchmarks/results/ds_resnet50.txt
.venv/bin/dsnet bench --model ds_vit_small --batch-sizes 1,32 --threads 2 --repeats 5 --warmup 1 \
    --json benchmarks/results/ds_vit_small.json 2>/dev/null | tee benchmarks/results/ds_vit_small.txt
# the paper's gate on ResNet-50 (the dynamic rows; the sliced / static rows do not depend on the gate)
.venv/bin/dsnet bench --model ds_resnet50 --gate-mode pre --batch-sizes 1,32 --threads 2 --repeats 5 --warmup 1 \
    --json benchmarks/results/ds_resnet50_pre_gate.json 2>/dev/null | tee benchmarks/results/ds_resnet50_pre_gate.txt
# dynamic inference against its routed groups as static networks (the "grouped static" lines; docs/benchmarks.md, Targets)
.venv/bin/dsnet bench --model ds_resnet8_tiny --batch-sizes 1,256 --threads 2 --repeats 15 --warmup 2 --no-masked \
    --json benchmarks/results/grouped_ds_resnet8_tiny.json 2>/dev/null | tee benchmarks/results/grouped_ds_resnet8_tiny.txt
.venv/bin/dsnet bench --model ds_resnet50 --batch-sizes 1,32 --threads 2 --repeats 5 --warmup 1 --no-masked \
    --json benchmarks/results/grouped_ds_resnet50.json 2>/dev/null | tee benchmarks/results/grouped_ds_resnet50.txt
