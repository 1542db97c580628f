#!/usr/bin/env python3
"""Loads a `format = hf` export in transformers and checks prunec's perplexity.

Usage:
  check_llm.py --out OUT --export model --label "lm on heldout" \
      --text data/text/moby-dick.txt --seq 256 --samples 16 [--offset 0]

OUT is the `prunec run` output folder (its report.json gives prunec's perplexity
for the evaluation labelled LABEL, which must have run on the exported state).
The tokens are cut as prunec cuts them (a text prefix ending at a line break,
no BOS), in windows of SEQ tokens; the model runs in float32 (bf16 weights are
widened, as prunec computes). Fails unless the perplexities agree within 0.1%
and the folder holds the recipe and lock prunec put there.
"""
import argparse
import json
import math
import pathlib
import sys

import torch
from tokenizers import Tokenizer
from transformers import AutoModelForCausalLM


def leading_tokens(tok, text: bytes, max_tokens: int):
    """prunec's `leading_tokens`: encode growing prefixes cut at a line break."""
    budget = max(max_tokens * 8, 1024)
    while True:
        if budget >= len(text):
            prefix = text
        else:
            cut = text[:budget].rfind(b"\n")
            if cut <= 0:
                cut = budget
                while cut > 0 and (text[cut] & 0xC0) == 0x80:
                    cut -= 1
            prefix = text[:cut]
        ids = tok.encode(prefix.decode("utf-8"), add_special_tokens=False).ids
        if len(ids) >= max_tokens or len(prefix) == len(text):
            return ids[:max_tokens]
        budget *= 2


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--export", default="model")
    ap.add_argument("--label", required=True)
    ap.add_argument("--text", required=True)
    ap.add_argument("--seq", type=int, required=True)
    ap.add_argument("--samples", type=int, required=True)
    ap.add_argument("--offset", type=int, default=0)
    ap.add_argument("--dtype", default=None, help="expected torch dtype of the weights, e.g. bfloat16")
    ap.add_argument("--expect", nargs="*", default=[], help="config.json values the export must have, KEY=INT")
    a = ap.parse_args()
    out = pathlib.Path(a.out)
    folder = out / a.export
    report = json.loads((out / "report.json").read_text())
    evals = [e for e in report["evaluations"] if e["label"] == a.label]
    if not evals:
        sys.exit(f"no evaluation labelled {a.label!r} in {out / 'report.json'}")
    want = evals[-1]["metrics"]["perplexity"]
    for f in ["recipe.prune", "prune.lock", "config.json"]:
        if not (folder / f).is_file():
            sys.exit(f"{folder} lacks {f}")

    config = json.loads((folder / "config.json").read_text())
    for kv in a.expect:
        key, value = kv.split("=")
        if config.get(key) != int(value):
            sys.exit(f"{folder}/config.json has {key} = {config.get(key)}, expected {value}")

    tok = Tokenizer.from_file(str(folder / "tokenizer.json"))
    ids = leading_tokens(tok, pathlib.Path(a.text).read_bytes(), a.samples * a.seq + a.offset)
    ids = ids[a.offset:]
    windows = len(ids) // a.seq
    if windows == 0:
        sys.exit("fewer tokens than one window")
    stored, info = AutoModelForCausalLM.from_pretrained(folder, dtype="auto", output_loading_info=True)
    for kind in ["missing_keys", "mismatched_keys"]:
        if info.get(kind):
            sys.exit(f"{folder}: transformers reports {kind}: {info[kind]}")
    if a.dtype and str(stored.dtype) != f"torch.{a.dtype}":
        sys.exit(f"the export loads as {stored.dtype}, expected torch.{a.dtype}")
    stored_dtype = stored.dtype
    model = stored.float().eval()
    total, count = 0.0, 0
    with torch.no_grad():
        for w in range(windows):
            x = torch.tensor([ids[w * a.seq:(w + 1) * a.seq]])
            logits = model(input_ids=x).logits[0].double()
            nll = torch.nn.functional.cross_entropy(logits[:-1], x[0, 1:], reduction="sum")
            total += nll.item()
            count += a.seq - 1
    got = math.exp(total / count)
    rel = abs(got - want) / want
    print(f"{folder}: transformers perplexity {got:.4f}, prunec {want:.4f} "
          f"(relative difference {rel:.2e}); weights stored as {stored_dtype}")
    if rel > 1e-3:
        sys.exit("perplexities differ by more than 0.1%")


if __name__ == "__main__":
    main()
