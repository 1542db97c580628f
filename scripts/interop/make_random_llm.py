#!/usr/bin/env python3
"""Makes a 1B-class random Llama checkpoint in bf16 (for the memory check of
`hf(...)` models: a model several times SmolLM2's size pruned within 24 GB).

Llama layout with SmolLM2's tokenizer (vocabulary 49152): hidden 2048, 16
layers, 32 heads over 8 key/value heads, FFN 8192, tied embedding: about 1.07
billion parameters, 2.1 GB in bf16, saved in 1 GB shards. Random weights
(std 0.02, seeded): the point is memory and the format, not quality.

Usage: make_random_llm.py TOKENIZER_JSON OUT_FOLDER
"""
import pathlib
import shutil
import sys

import torch
import transformers

tok, dst = pathlib.Path(sys.argv[1]), pathlib.Path(sys.argv[2])
config = transformers.LlamaConfig(
    vocab_size=49152, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
    num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=2048,
    rms_norm_eps=1e-5, tie_word_embeddings=True, bos_token_id=1, eos_token_id=2,
    dtype="bfloat16",
)
torch.manual_seed(0)
with torch.device("cpu"):
    torch.set_default_dtype(torch.bfloat16)
    model = transformers.LlamaForCausalLM(config)
model = model.to(torch.bfloat16)
print(f"{sum(p.numel() for p in model.parameters()) / 1e9:.2f} B parameters")
tmp = dst.with_name(dst.name + ".tmp")
if tmp.exists():
    shutil.rmtree(tmp)
model.save_pretrained(tmp, max_shard_size="1GB")
shutil.copy(tok, tmp / "tokenizer.json")
if dst.exists():
    shutil.rmtree(dst)
tmp.rename(dst)
print(f"wrote {dst}: {sorted(p.name for p in dst.iterdir())}")
