#!/usr/bin/env bash
# prunec against llm-compressor on the same weights and calibration: makes
# .venv-llmc (llm-compressor 0.14.0.1 with its PyTorch and transformers),
# builds prunec, and runs scripts/interop/compare_llmcompressor.py, which
#   - writes SmolLM2-135M (the GGUF dequantized to f32) as a Hugging Face
#     folder both tools read;
#   - prunes it with Wanda and SparseGPT, to 50% and 2:4, with prunec
#     (`prunec run --save-calibration`) and with llm-compressor's `oneshot`
#     fed the very token windows prunec calibrated on (32 x 256 tokens of
#     State of the Union addresses, one draw per seed);
#   - measures every result with transformers on Moby-Dick and on e-mail text
#     (SpamAssassin's easy ham, message bodies), both held out;
#   - compares block 0's pruned layers (the same inputs for both tools):
#     reconstruction error on the calibration inputs, weights pruned alike;
#   - prints per-seed and mean perplexities and each tool's pruning time.
# Results accumulate in WORK/results.json (default out/compare-llmcompressor),
# so a later call adds seeds or `--prunec-options 'true_sequential = true'`.
# Not part of CI (the PyTorch install alone is gigabytes, and every variant
# is pruned twice and measured four times). Arguments go to the Python
# script: `--seeds 0,1,2`, `--threads N`, `--methods wanda`, `--patterns 2:4`,
# `--work DIR`, `--llmc-reversed` (llm-compressor again on the windows in
# reverse order: its own run-to-run spread), `--sparsegpt-args
# 'precision = f64'`. LLMC_VENV names another virtual environment to use.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
venv="${LLMC_VENV:-.venv-llmc}"
py="$venv/bin/python"
if ! "$py" -c 'import llmcompressor, transformers, safetensors, tokenizers, datasets' 2>/dev/null; then
  python3 -m venv "$venv"
  "$venv/bin/pip" install --quiet --upgrade pip
  "$venv/bin/pip" install --quiet llmcompressor==0.14.0.1 transformers safetensors tokenizers datasets numpy
fi
scripts/fetch-data.sh smollm2 text
cargo build --release -p prunec
PRUNEC="${CARGO_TARGET_DIR:-target}/release/prunec" "$py" scripts/interop/compare_llmcompressor.py "$@"
