#!/usr/bin/env bash
# The main job: fetch MNIST, build prunec (release) and run the flagship
# recipe, Han et al.'s iterative magnitude pruning of LeNet-300-100 to 92%
# sparsity. Extra arguments go to `prunec run` (e.g. --set epochs=1).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
scripts/fetch-data.sh mnist
cargo build --release -p prunec
prunec="${CARGO_TARGET_DIR:-target}/release/prunec"
"$prunec" run examples/lenet300_magnitude.prune --out out/lenet300_magnitude "$@"
"$prunec" verify out/lenet300_magnitude/prune.lock
