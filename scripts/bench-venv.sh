#!/usr/bin/env bash
# Makes .venv-bench, the Python virtual environment `prunec bench train|llm`
# runs its PyTorch side in (scripts/bench_torch.py). Not needed by the tests
# or CI: without it the benches report prunec alone.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m venv .venv-bench
.venv-bench/bin/pip install --quiet --upgrade pip
.venv-bench/bin/pip install --quiet torch numpy safetensors
.venv-bench/bin/python -c 'import torch; print("torch", torch.__version__, "threads", torch.get_num_threads())'
