#!/usr/bin/env bash
# Checks prunec's exports in the stacks users load them with: makes
# .venv-interop (transformers, torch, onnx, onnxruntime), builds prunec, runs
# the example recipes and loads every export there:
#   - the four tiny Hugging Face architectures (tests/models), pruned with
#     Wanda 2:4 and exported: transformers' perplexity equals prunec's (0.1%);
#     and with FFN neurons and a kv group removed (tiny_llm_units.prune): the
#     export's config gives the smaller sizes, transformers loads it and its
#     perplexity equals prunec's (0.1%);
#   - SmolLM2-135M as a bf16 sharded Hugging Face checkpoint (made here from the
#     GGUF) pruned by examples/llm_hf_wanda24.prune: the export is bf16, holds
#     its recipe and lock, and transformers' perplexity equals prunec's (0.1%);
#   - tests/recipes/run/tiny_llm_moe.prune on the tiny Qwen3-MoE and Mixtral
#     (experts and atomic experts removed by HEAPr; atomic experts by REAP
#     with equal widths): the exports' configs give 6 experts padded to one
#     width and 8 experts of 12, and transformers' perplexity equals
#     prunec's (0.1%);
#   - tests/recipes/run/tiny_llm_flap.prune and examples/llm_ffn_heads.prune
#     (SmolLM2 with FFN neurons and a kv group removed, FLAP-compensated):
#     the export's config gives the smaller sizes and the biases, and
#     transformers' perplexity equals prunec's (0.1%);
#   - the ONNX example (examples/onnx_digits.prune): onnxruntime counts the
#     same correct top-1 predictions as prunec's reported accuracy, and every
#     pruned initializer keeps the report's count of non-zeros.
# With INTEROP_LARGE=1 it also makes a random 1.07B-parameter bf16 Llama and
# checks that Wanda prunes it within 24 GiB (the report's peak memory).
# Not part of CI (the PyTorch install alone is gigabytes); run before every
# release. Extra arguments go to the SmolLM2 run (e.g. --set eval_samples=4).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
py=.venv-interop/bin/python
if ! "$py" -c 'import torch, transformers, onnx, onnxruntime, tokenizers' 2>/dev/null; then
  python3 -m venv .venv-interop
  .venv-interop/bin/pip install --quiet --upgrade pip
  .venv-interop/bin/pip install --quiet torch numpy safetensors transformers tokenizers onnx onnxruntime onnxscript
fi
scripts/fetch-data.sh smollm2 text digits
cargo build --release -p prunec
prunec="${CARGO_TARGET_DIR:-target}/release/prunec"
out=out/interop
mkdir -p "$out"

echo "== tiny Hugging Face architectures"
for arch in llama mistral qwen2 qwen3; do
  "$prunec" run -q tests/recipes/run/tiny_llm_hf.prune --set "model_dir=\"tests/models/tiny-$arch\"" --out "$out/tiny-$arch"
  "$py" scripts/interop/check_llm.py --out "$out/tiny-$arch" --label pruned \
    --text tests/models/tiny.txt --seq 32 --samples 8 --offset 1024
done

echo "== tiny Hugging Face architectures, FFN neurons, a kv group and a query head removed"
for arch in llama mistral qwen2 qwen3; do
  "$prunec" run -q tests/recipes/run/tiny_llm_units.prune --set "model_dir=\"tests/models/tiny-$arch\"" --out "$out/tiny-units-$arch"
  "$py" scripts/interop/check_llm.py --out "$out/tiny-units-$arch" --label pruned \
    --text tests/models/tiny.txt --seq 32 --samples 8 --offset 1024 \
    --expect intermediate_size=48 num_key_value_heads=1 num_attention_heads=1
done

echo "== tiny Llama with FLAP's bias compensation (mlp_bias, attention_bias)"
"$prunec" run -q tests/recipes/run/tiny_llm_flap.prune --out "$out/tiny-flap"
"$py" scripts/interop/check_llm.py --out "$out/tiny-flap" --label pruned \
  --text tests/models/tiny.txt --seq 32 --samples 8 --offset 1024 \
  --expect intermediate_size=32 num_key_value_heads=1 mlp_bias=1 attention_bias=1

echo "== tiny Qwen3-MoE and Mixtral with experts and atomic experts removed (HEAPr)"
for arch in qwen3-moe:moe_intermediate_size mixtral:intermediate_size; do
  name="${arch%%:*}" width="${arch##*:}"
  "$prunec" run -q tests/recipes/run/tiny_llm_moe.prune --set "model_dir=\"tests/models/tiny-$name\"" --out "$out/tiny-$name"
  "$py" scripts/interop/check_llm.py --out "$out/tiny-$name" --label heapr \
    --text tests/models/tiny.txt --seq 32 --samples 8 --offset 1024 \
    --expect num_local_experts=6 "$width=16"
  "$py" scripts/interop/check_llm.py --out "$out/tiny-$name" --export equal --label by_reap \
    --text tests/models/tiny.txt --seq 32 --samples 8 --offset 1024 \
    --expect num_local_experts=8 "$width=12"
done

echo "== SmolLM2-135M, bf16 Hugging Face checkpoint, Wanda 2:4"
if [ ! -f data/smollm2/hf-bf16/config.json ]; then
  "$prunec" run -q scripts/interop/smollm2_to_hf.prune --out "$out/smollm2_f32"
  "$py" scripts/interop/make_smollm2_hf.py "$out/smollm2_f32/model" data/smollm2/hf-bf16
fi
"$prunec" run examples/llm_hf_wanda24.prune --out "$out/llm_hf_wanda24" "$@"
"$py" scripts/interop/check_llm.py --out "$out/llm_hf_wanda24" --label pruned --dtype bfloat16 \
  --text data/text/moby-dick.txt --seq 256 \
  --samples "$(grep -o '"eval_samples": [0-9]*' "$out/llm_hf_wanda24/report.json" | grep -o '[0-9]*$')"

echo "== SmolLM2-135M, 20% of FFN neurons and one kv group per block removed"
"$prunec" run examples/llm_ffn_heads.prune --out "$out/llm_ffn_heads"
"$py" scripts/interop/check_llm.py --out "$out/llm_ffn_heads" --label pruned \
  --text data/text/moby-dick.txt --seq 256 --samples 16 \
  --expect intermediate_size=1229 num_key_value_heads=2 num_attention_heads=6 mlp_bias=1 attention_bias=1

echo "== ONNX digits classifier"
"$prunec" run examples/onnx_digits.prune --out "$out/onnx_digits"
"$py" scripts/interop/check_onnx.py "$out/onnx_digits"
if [ "${INTEROP_LARGE:-0}" = 1 ]; then
  echo "== 1.07B-parameter bf16 Llama (random weights): Wanda 50% within 24 GB"
  if [ ! -f data/random-llama-1b/config.json ]; then
    "$py" scripts/interop/make_random_llm.py data/smollm2/hf-bf16/tokenizer.json data/random-llama-1b
  fi
  "$prunec" run examples/llm_hf_1b_memory.prune --out "$out/llm_hf_1b_memory"
  "$py" - "$out/llm_hf_1b_memory/report.json" <<'PY'
import json, sys
peak = json.load(open(sys.argv[1]))["peak_memory_bytes"]
print(f"peak resident memory {peak / 2**30:.2f} GiB")
assert peak < 24 * 2**30, "over 24 GiB"
PY
fi
echo "interop: every export loads and reproduces prunec's metrics"
