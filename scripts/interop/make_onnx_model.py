#!/usr/bin/env python3
"""Builds the ONNX test models under tests/models/ and their expected outputs.

Usage (from the repository root, after `scripts/fetch-data.sh digits`):

    .venv-interop/bin/python scripts/interop/make_onnx_model.py

Writes, deterministically (seeded, CPU, single thread):

- `digits_cnn.onnx`: a small residual CNN trained on the 8x8 digits (the
  first 1437 samples of `data/digits/digits.csv.gz`, pixels / 16, as prunec's
  `digits(...)` data set reads them): Conv, BatchNormalization, Relu,
  MaxPool, Add, AveragePool, Reshape, Gemm (transB = 1) and MatMul + Add.
  The graph is written with `onnx.helper` from the trained PyTorch weights,
  so every op and initializer name is the one listed here (initializers are
  named after the PyTorch parameters: `conv1.weight`, `bn1.running_mean`, ...).
- `digits_cnn.expected.json`: onnxruntime's logits for the first 8 test
  samples (with the inputs) and its top-1 accuracy on the 360 test samples.
- `ops_mix.onnx` + `ops_mix.expected.json`: a small graph with seeded random
  weights for the ops the CNN does not use (strided Conv with asymmetric
  pads, MaxPool with stride 1, GlobalAveragePool, Flatten, Gemm with
  transB = 0, Dropout, Identity, Tanh, Softmax) and onnxruntime's outputs.
- `unsupported_op.onnx`: a graph with an op prunec does not run (`Erf`).
- `truncated.onnx`: the first 1000 bytes of `digits_cnn.onnx`.
"""

import gzip
import json
import pathlib

import numpy as np
import onnx
import onnxruntime as ort
import torch
from onnx import TensorProto, helper, numpy_helper

ROOT = pathlib.Path(__file__).resolve().parents[2]
OUT = ROOT / "tests" / "models"
OPSET = 17
TRAIN = 1437  # prunec's DIGITS_TRAIN: the rest is the test split


def load_digits():
    with gzip.open(ROOT / "data" / "digits" / "digits.csv.gz", "rt") as f:
        rows = [line.strip().split(",") for line in f if line.strip()]
    a = np.array(rows, dtype=np.float32)
    x = (a[:, :64] / 16.0).astype(np.float32).reshape(-1, 1, 8, 8)
    y = a[:, 64].astype(np.int64)
    return x, y


class Net(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = torch.nn.Conv2d(1, 8, 3, padding=1)
        self.bn1 = torch.nn.BatchNorm2d(8)
        self.conv2 = torch.nn.Conv2d(8, 16, 3, padding=1)
        self.bn2 = torch.nn.BatchNorm2d(16)
        self.conv3 = torch.nn.Conv2d(16, 16, 3, padding=1)
        self.bn3 = torch.nn.BatchNorm2d(16)
        self.fc1 = torch.nn.Linear(64, 32)
        self.fc2 = torch.nn.Linear(32, 10)

    def forward(self, x):
        h = torch.nn.functional.max_pool2d(torch.relu(self.bn1(self.conv1(x))), 2)
        h = torch.relu(self.bn2(self.conv2(h)))
        h = torch.relu(self.bn3(self.conv3(h)) + h)
        h = torch.nn.functional.avg_pool2d(h, 2).reshape(-1, 64)
        return self.fc2(torch.relu(self.fc1(h)))


def train(x, y):
    torch.manual_seed(0)
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    net = Net()
    opt = torch.optim.Adam(net.parameters(), lr=3e-3)
    xt, yt = torch.from_numpy(x[:TRAIN]), torch.from_numpy(y[:TRAIN])
    g = torch.Generator().manual_seed(0)
    for _ in range(40):
        net.train()
        for idx in torch.randperm(TRAIN, generator=g).split(64):
            opt.zero_grad()
            loss = torch.nn.functional.cross_entropy(net(xt[idx]), yt[idx])
            loss.backward()
            opt.step()
    net.eval()
    return net


def init(name, array):
    return numpy_helper.from_array(np.ascontiguousarray(array, dtype=np.float32), name)


def digits_graph(net):
    sd = {k: v.detach().numpy() for k, v in net.state_dict().items() if "num_batches" not in k}
    inits = [init(k, v) for k, v in sd.items() if k != "fc2.weight"]
    # MatMul reads its weight as [in, out]: prunec must transpose it.
    inits.append(init("fc2.weight", sd["fc2.weight"].T))
    inits.append(numpy_helper.from_array(np.array([-1, 64], dtype=np.int64), "flat_shape"))

    def bn(name, x, out):
        return helper.make_node(
            "BatchNormalization",
            [x, f"{name}.weight", f"{name}.bias", f"{name}.running_mean", f"{name}.running_var"],
            [out], name=name, epsilon=1e-5)

    def conv(name, x, out):
        return helper.make_node("Conv", [x, f"{name}.weight", f"{name}.bias"], [out], name=name,
                                kernel_shape=[3, 3], pads=[1, 1, 1, 1], strides=[1, 1])

    nodes = [
        conv("conv1", "input", "c1"), bn("bn1", "c1", "b1"),
        helper.make_node("Relu", ["b1"], ["r1"], name="relu1"),
        helper.make_node("MaxPool", ["r1"], ["p1"], name="pool1", kernel_shape=[2, 2], strides=[2, 2]),
        conv("conv2", "p1", "c2"), bn("bn2", "c2", "b2"),
        helper.make_node("Relu", ["b2"], ["r2"], name="relu2"),
        conv("conv3", "r2", "c3"), bn("bn3", "c3", "b3"),
        helper.make_node("Add", ["b3", "r2"], ["s3"], name="residual"),
        helper.make_node("Relu", ["s3"], ["r3"], name="relu3"),
        helper.make_node("AveragePool", ["r3"], ["p3"], name="pool3", kernel_shape=[2, 2], strides=[2, 2]),
        helper.make_node("Reshape", ["p3", "flat_shape"], ["flat"], name="flatten"),
        helper.make_node("Gemm", ["flat", "fc1.weight", "fc1.bias"], ["f1"], name="fc1", transB=1),
        helper.make_node("Relu", ["f1"], ["r4"], name="relu4"),
        helper.make_node("MatMul", ["r4", "fc2.weight"], ["m2"], name="fc2"),
        helper.make_node("Add", ["m2", "fc2.bias"], ["logits"], name="fc2_bias"),
    ]
    graph = helper.make_graph(
        nodes, "digits_cnn",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", 1, 8, 8])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 10])],
        inits)
    return finish(graph)


def ops_graph():
    rng = np.random.default_rng(0)
    w = lambda *s: rng.standard_normal(s).astype(np.float32) * 0.5
    inits = [
        init("conv.weight", w(4, 1, 3, 3)), init("conv.bias", w(4)),
        init("bn.weight", w(4) + 1.0), init("bn.bias", w(4)),
        init("bn.mean", w(4)), init("bn.var", np.abs(w(4)) + 0.5),
        # Gemm with transB = 0: the weight is stored [in, out].
        init("gemm.weight", w(4, 6)), init("gemm.bias", w(6)),
        init("head.weight", w(6, 3)), init("head.bias", w(3)),
    ]
    nodes = [
        # Stride 2, pads (top, left, bottom, right) = (0, 1, 1, 0): 8x8 -> 4x4.
        helper.make_node("Conv", ["input", "conv.weight", "conv.bias"], ["c"], name="conv",
                         kernel_shape=[3, 3], pads=[0, 1, 1, 0], strides=[2, 2]),
        helper.make_node("BatchNormalization", ["c", "bn.weight", "bn.bias", "bn.mean", "bn.var"],
                         ["b"], name="bn", epsilon=1e-3),
        helper.make_node("Identity", ["b"], ["i"], name="identity"),
        helper.make_node("Relu", ["i"], ["r"], name="relu"),
        helper.make_node("MaxPool", ["r"], ["m"], name="maxpool", kernel_shape=[2, 2], strides=[1, 1]),
        helper.make_node("AveragePool", ["m"], ["a"], name="avgpool", kernel_shape=[3, 3]),
        helper.make_node("GlobalAveragePool", ["r"], ["g"], name="gap"),
        helper.make_node("Add", ["a", "g"], ["s"], name="add"),
        helper.make_node("Flatten", ["s"], ["f"], name="flatten", axis=1),
        helper.make_node("Gemm", ["f", "gemm.weight", "gemm.bias"], ["h"], name="gemm",
                         alpha=0.75, beta=1.5),
        helper.make_node("Dropout", ["h"], ["d"], name="dropout"),
        helper.make_node("Tanh", ["d"], ["t"], name="tanh"),
        helper.make_node("MatMul", ["t", "head.weight"], ["hm"], name="head"),
        helper.make_node("Add", ["hm", "head.bias"], ["hb"], name="head_bias"),
        helper.make_node("Softmax", ["hb"], ["probs"], name="softmax", axis=-1),
    ]
    graph = helper.make_graph(
        nodes, "ops_mix",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", 1, 8, 8])],
        [helper.make_tensor_value_info("probs", TensorProto.FLOAT, ["N", 3])],
        inits)
    return finish(graph)


def unsupported_graph():
    rng = np.random.default_rng(1)
    inits = [init("fc.weight", rng.standard_normal((10, 64))), init("fc.bias", np.zeros(10))]
    nodes = [
        helper.make_node("Flatten", ["input"], ["f"], name="flatten"),
        helper.make_node("Gemm", ["f", "fc.weight", "fc.bias"], ["h"], name="fc", transB=1),
        helper.make_node("Erf", ["h"], ["logits"], name="erf_0"),
    ]
    graph = helper.make_graph(
        nodes, "unsupported_op",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", 1, 8, 8])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 10])],
        inits)
    return finish(graph)


def finish(graph):
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)],
                              producer_name="prunec make_onnx_model.py")
    model.ir_version = 8
    onnx.checker.check_model(model, full_check=True)
    return model


def run(model, x):
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    sess = ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    return sess.run(None, {"input": x})[0]


def main():
    OUT.mkdir(parents=True, exist_ok=True)
    x, y = load_digits()
    net = train(x, y)
    digits = digits_graph(net)
    test_x, test_y = x[TRAIN:], y[TRAIN:]
    logits = run(digits, test_x)
    with torch.no_grad():
        torch_logits = net(torch.from_numpy(test_x)).numpy()
    assert np.abs(logits - torch_logits).max() < 1e-4, "onnxruntime and PyTorch disagree"
    accuracy = float((logits.argmax(1) == test_y).mean())
    (OUT / "digits_cnn.onnx").write_bytes(digits.SerializeToString())
    expected = {
        "model": "digits_cnn.onnx",
        "inputs": test_x[:8].reshape(8, 64).tolist(),
        "logits": logits[:8].tolist(),
        "test_samples": int(len(test_y)),
        "accuracy": accuracy,
    }
    (OUT / "digits_cnn.expected.json").write_text(json.dumps(expected, indent=1) + "\n")

    ops = ops_graph()
    probs = run(ops, x[:5])
    (OUT / "ops_mix.onnx").write_bytes(ops.SerializeToString())
    (OUT / "ops_mix.expected.json").write_text(json.dumps({
        "model": "ops_mix.onnx",
        "inputs": x[:5].reshape(5, 64).tolist(),
        "logits": probs.tolist(),
    }, indent=1) + "\n")

    (OUT / "unsupported_op.onnx").write_bytes(unsupported_graph().SerializeToString())
    (OUT / "truncated.onnx").write_bytes(digits.SerializeToString()[:1000])
    print(f"digits_cnn.onnx: test accuracy {accuracy:.4f} ({len(test_y)} samples)")


if __name__ == "__main__":
    main()
