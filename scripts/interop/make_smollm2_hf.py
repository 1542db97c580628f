#!/usr/bin/env python3
"""Makes data/smollm2/hf-bf16: SmolLM2-135M as a Hugging Face bf16 checkpoint.

prunec writes the GGUF's weights (dequantized to f32) as a Hugging Face folder
(scripts/interop/smollm2_to_hf.prune, run by scripts/interop.sh before this);
transformers loads that folder and saves it in bf16, in 100 MB shards so that
the sharded path is exercised on a real model.

Usage: make_smollm2_hf.py F32_FOLDER OUT_FOLDER
"""
import pathlib
import shutil
import sys

import torch
from transformers import AutoModelForCausalLM

src, dst = pathlib.Path(sys.argv[1]), pathlib.Path(sys.argv[2])
model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32)
model = model.to(torch.bfloat16)
tmp = dst.with_name(dst.name + ".tmp")
if tmp.exists():
    shutil.rmtree(tmp)
model.save_pretrained(tmp, max_shard_size="100MB")
shutil.copy(src / "tokenizer.json", tmp / "tokenizer.json")
if dst.exists():
    shutil.rmtree(dst)
tmp.rename(dst)
print(f"wrote {dst}: {sorted(p.name for p in dst.iterdir())}")
