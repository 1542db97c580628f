#!/usr/bin/env bash
# The test command: fetches the data the tests read (idempotent), then runs
# every test of the workspace with cargo-nextest (cargo test if it is absent).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
scripts/fetch-data.sh mnist fashion digits cnn smollm2 text
export CARGO_TERM_COLOR="${CARGO_TERM_COLOR:-never}"
if cargo nextest --version >/dev/null 2>&1; then
  cargo nextest run --workspace --no-fail-fast "$@"
else
  cargo test --workspace --no-fail-fast "$@"
fi
