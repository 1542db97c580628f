#!/usr/bin/env python3
"""Checks a pruned ONNX export of `prunec run` in onnxruntime.

Usage (from the repository root):

    .venv-interop/bin/python scripts/interop/check_onnx.py OUT_DIR \
        [--digits data/digits/digits.csv.gz] [--split test] [--evaluation LABEL]

OUT_DIR is the output folder of a run that exported an `onnx(...)` model
(e.g. `prunec run examples/onnx_digits.prune --out out/onnx_digits`). The
script reads OUT_DIR/report.json, loads the `.onnx` file it lists among the
outputs (its sha256 must match), runs it in onnxruntime on the digits split
the evaluation read (prunec's `digits(...)` data set: pixels / 16, the first
1437 samples are the train split, the other 360 the test split), and asserts:

- the number of correct top-1 predictions is exactly the one behind the
  accuracy of the report's last evaluation after pruning (or `--evaluation
  LABEL`), i.e. onnxruntime and prunec agree on the accuracy;
- onnxruntime's top-1 class of every sample is prunec's: the sha256 of the
  predicted classes (u32 little-endian, sample order) equals the report's
  `predictions_sha256` of that evaluation;
- every initializer the report lists keeps exactly the report's count of
  non-zero values.

Exits 0 when all hold, 1 otherwise.
"""

import argparse
import gzip
import hashlib
import json
import pathlib
import sys

import numpy as np
import onnx
import onnxruntime as ort
from onnx import numpy_helper

DIGITS_TRAIN = 1437


def digits(path, split):
    with gzip.open(path, "rt") as f:
        rows = [line.strip().split(",") for line in f if line.strip()]
    a = np.array(rows, dtype=np.float32)
    part = slice(0, DIGITS_TRAIN) if split == "train" else slice(DIGITS_TRAIN, None)
    x = (a[part, :64] / 16.0).astype(np.float32)
    return x, a[part, 64].astype(np.int64)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("out_dir", type=pathlib.Path)
    ap.add_argument("--digits", default="data/digits/digits.csv.gz")
    ap.add_argument("--split", choices=["train", "test"], default="test")
    ap.add_argument("--evaluation", help="label of the evaluation to compare (default: the last with accuracy)")
    args = ap.parse_args()

    report = json.loads((args.out_dir / "report.json").read_text())
    exports = [o for o in report["outputs"] if o["path"].endswith(".onnx")]
    if len(exports) != 1:
        sys.exit(f"expected one .onnx output in the report, found {[o['path'] for o in exports]}")
    path = args.out_dir / exports[0]["path"]
    data = path.read_bytes()
    if hashlib.sha256(data).hexdigest() != exports[0]["sha256"]:
        sys.exit(f"{path}: sha256 differs from the report's")
    evals = [e for e in report["evaluations"] if "accuracy" in e["metrics"]]
    if args.evaluation:
        evals = [e for e in evals if e["label"] == args.evaluation]
    if not evals:
        sys.exit("no evaluation with an accuracy in the report")
    reported = evals[-1]["metrics"]["accuracy"]

    model = onnx.load_from_string(data)
    onnx.checker.check_model(model, full_check=True)
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    sess = ort.InferenceSession(data, opts, providers=["CPUExecutionProvider"])
    inp = sess.get_inputs()[0]
    x, y = digits(args.digits, args.split)
    shape = [len(x)] + [d for d in inp.shape[1:]]
    logits = sess.run(None, {inp.name: x.reshape(shape)})[0]
    correct = int((logits.argmax(1) == y).sum())
    reported_correct = round(reported * len(y))
    ok = True
    print(f"{path}: onnxruntime {correct}/{len(y)} correct ({correct / len(y):.4%}), "
          f"prunec reported {reported:.4%} ({reported_correct}/{len(y)}) in `{evals[-1]['label']}`")
    if correct != reported_correct:
        print("MISMATCH: onnxruntime and prunec disagree on the accuracy")
        ok = False
    # prunec's digest of its top-1 class per sample (u32 little-endian, in order).
    ours = hashlib.sha256(logits.argmax(1).astype("<u4").tobytes()).hexdigest()
    theirs = evals[-1].get("predictions_sha256")
    if ours != theirs:
        print(f"MISMATCH: onnxruntime's top-1 predictions differ from prunec's (sha256 {ours[:16]} vs {theirs and theirs[:16]})")
        ok = False
    else:
        print("identical top-1 predictions for every sample (sha256 of the classes agrees)")

    inits = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    # The exported model: the subject of the (last) export step.
    model_name = [s["model"] for s in report["steps"] if s["kind"] == "export"][-1]
    for layer in report["layers"]:
        if layer["model"] != model_name or layer["name"] not in inits:
            continue
        kept = int(np.count_nonzero(inits[layer["name"]]))
        if kept != layer["kept"]:
            print(f"MISMATCH: {layer['name']} keeps {kept} values in the file, the report says {layer['kept']}")
            ok = False
    print("ok" if ok else "FAILED")
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
