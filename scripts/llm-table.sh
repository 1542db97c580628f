#!/usr/bin/env bash
# The README's language-model table, from `prunec run`: the sweep of
# examples/llm_table.prune over three targets (dense evaluation shared),
# whose sweep.md holds the table. Extra arguments go to `prunec run`
# (e.g. `--set eval_samples=64` for the reference 16,384 tokens).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
scripts/fetch-data.sh smollm2 text
out="${OUT:-out/llm-table}"
cargo run -q -p prunec -- run examples/llm_table.prune \
  --sweep target=50%,4:8,2:4 --out "$out" "$@"
sed -n '/^| variant/,/^$/p' "$out/sweep.md"
