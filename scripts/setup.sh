#!/usr/bin/env bash
# Create .venv and install dsnet into it.  Usage: bash scripts/setup.sh [dev]
#   dev: also the test and export tools (pytest, ruff, onnx, onnxruntime).
# As root with apt, it also installs Fashion-MNIST (Debian's dataset-fashion-mnist; scripts/install_data.sh,
# never fatal); elsewhere dsnet downloads the data itself when it first needs it.
# torch is pinned by constraints.txt. uv is used when it can be installed
# (seconds instead of ~90 s); it is pointed at pip's find-links so a locally
# served torch wheel is used where one exists.
set -euo pipefail
cd "$(dirname "$0")/.."
extra=""
[[ "${1:-}" == "dev" ]] && extra="[dev]"
py=${PYTHON:-python3}
[[ -x .venv/bin/python ]] || "$py" -m venv .venv
links=$("$py" -m pip config get global.find-links 2>/dev/null || true)
if .venv/bin/python -m pip install -q --disable-pip-version-check uv 2>/dev/null; then
    args=(--python .venv/bin/python -c constraints.txt)
    [[ -n "$links" ]] && args+=(--find-links "$links")
    .venv/bin/python -m uv pip install -q "${args[@]}" -e ".${extra}"
else
    .venv/bin/python -m pip install -q --disable-pip-version-check -c constraints.txt -e ".${extra}"
fi
bash scripts/install_data.sh
echo "dsnet installed in .venv ($(.venv/bin/python -c 'import torch; print("torch", torch.__version__)'))"
