#!/usr/bin/env python3
"""The PyTorch side of `prunec bench train` and `prunec bench llm`.

prunec runs this script with the same work it has just timed and reads one
JSON object per case from stdout: {"case", "items", "seconds", ...}. The
models are the built-in ones written in PyTorch (LeNet-300-100, LeNet-5 and
the digit CNN; a LLaMA-family decoder in plain torch), the data is handed
over by prunec (MNIST files, token ids, the dequantized language model as a
safetensors folder), so both sides do the same arithmetic on the same inputs.
Run outside CI: `scripts/bench-venv.sh` makes a virtual environment with torch.
"""

import argparse
import gzip
import json
import math
import os
import sys
import time

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn


def emit(**fields):
    print(json.dumps(fields), flush=True)


# ---------------------------------------------------------------- training


def read_idx(path):
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rb") as f:
        data = f.read()
    dims = data[3]
    shape = [int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(dims)]
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * dims).reshape(shape)


def find(folder, stem):
    for name in (stem, stem + ".gz"):
        path = os.path.join(folder, name)
        if os.path.exists(path):
            return path
    sys.exit(f"bench_torch: {stem} not found in {folder}")


class Normalize(nn.Module):
    def __init__(self, mean, std):
        super().__init__()
        self.mean, self.std = mean, std

    def forward(self, x):
        return (x - self.mean) / self.std


def classifier(name):
    if name == "lenet300":
        return nn.Sequential(
            nn.Flatten(),
            nn.Linear(784, 300),
            nn.ReLU(),
            nn.Linear(300, 100),
            nn.ReLU(),
            nn.Linear(100, 10),
        )
    if name == "lenet5":
        return nn.Sequential(
            nn.Conv2d(1, 6, 5, padding=2),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(6, 16, 5),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Flatten(),
            nn.Linear(400, 120),
            nn.ReLU(),
            nn.Linear(120, 84),
            nn.ReLU(),
            nn.Linear(84, 10),
        )
    if name == "digit_cnn":
        return nn.Sequential(
            Normalize(0.1307, 0.3081),
            nn.Conv2d(1, 32, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(32, 64, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(64, 128, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Flatten(),
            nn.Linear(1152, 256),
            nn.ReLU(),
            nn.Linear(256, 10),
        )
    sys.exit(f"bench_torch: unknown model {name}")


def train(args):
    images = read_idx(find(args.mnist, "train-images-idx3-ubyte"))[: args.samples]
    labels = read_idx(find(args.mnist, "train-labels-idx1-ubyte"))[: args.samples]
    # Pixels in [0, 1] as prunec reads them; the digit CNN normalises inside the model.
    x = torch.from_numpy(images.astype(np.float32) / 255.0).unsqueeze(1)
    y = torch.from_numpy(labels.astype(np.int64))
    torch.manual_seed(0)
    for name in args.models.split(","):
        model = classifier(name)
        opt = torch.optim.SGD(
            model.parameters(), lr=args.lr, momentum=args.momentum, weight_decay=args.weight_decay
        )
        g = torch.Generator().manual_seed(0)

        def epoch():
            order = torch.randperm(len(y), generator=g)
            total = 0.0
            for start in range(0, len(y), args.batch):
                idx = order[start : start + args.batch]
                opt.zero_grad(set_to_none=True)
                loss = F.cross_entropy(model(x[idx]), y[idx])
                loss.backward()
                opt.step()
                total += loss.item()
            return total / math.ceil(len(y) / args.batch)

        # One short warm-up (allocator, kernels), then the timed epoch.
        order = torch.randperm(len(y), generator=g)[: args.batch * 4]
        for start in range(0, len(order), args.batch):
            idx = order[start : start + args.batch]
            opt.zero_grad(set_to_none=True)
            F.cross_entropy(model(x[idx]), y[idx]).backward()
            opt.step()
        t0 = time.perf_counter()
        loss = epoch()
        emit(case=name, items=len(y), seconds=time.perf_counter() - t0, loss=loss)


# ---------------------------------------------------------- language model


class Llama:
    """A LLaMA-family decoder in plain torch, read from a safetensors folder."""

    def __init__(self, folder):
        from safetensors.torch import load_file

        with open(os.path.join(folder, "config.json")) as f:
            c = json.load(f)
        self.c = c
        self.w = load_file(os.path.join(folder, "model.safetensors"))
        self.nh, self.nkv = c["num_attention_heads"], c["num_key_value_heads"]
        self.hd = c["hidden_size"] // self.nh
        self.eps = c["rms_norm_eps"]
        half = self.hd // 2
        inv = 1.0 / (c.get("rope_theta", 10000.0) ** (torch.arange(half, dtype=torch.float64) * 2 / self.hd))
        pos = torch.arange(c["max_position_embeddings"], dtype=torch.float64)
        ang = torch.outer(pos, inv)
        self.cos, self.sin = ang.cos().float(), ang.sin().float()
        self.layers = c["num_hidden_layers"]

    def p(self, layer, name):
        return self.w[f"model.layers.{layer}.{name}.weight"]

    def rope(self, x):
        t = x.shape[2]
        cos, sin = self.cos[:t], self.sin[:t]
        x1, x2 = x[..., : self.hd // 2], x[..., self.hd // 2 :]
        return torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1)

    def block(self, l, x, sink=None):
        b, t, d = x.shape
        h = F.rms_norm(x, (d,), self.p(l, "input_layernorm"), self.eps)
        if sink:
            sink("attn", h)
        q = F.linear(h, self.p(l, "self_attn.q_proj")).view(b, t, self.nh, self.hd).transpose(1, 2)
        k = F.linear(h, self.p(l, "self_attn.k_proj")).view(b, t, self.nkv, self.hd).transpose(1, 2)
        v = F.linear(h, self.p(l, "self_attn.v_proj")).view(b, t, self.nkv, self.hd).transpose(1, 2)
        q, k = self.rope(q), self.rope(k)
        att = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
        att = att.transpose(1, 2).reshape(b, t, d)
        if sink:
            sink("o", att)
        x = x + F.linear(att, self.p(l, "self_attn.o_proj"))
        h = F.rms_norm(x, (d,), self.p(l, "post_attention_layernorm"), self.eps)
        if sink:
            sink("mlp", h)
        a = F.silu(F.linear(h, self.p(l, "mlp.gate_proj"))) * F.linear(h, self.p(l, "mlp.up_proj"))
        if sink:
            sink("down", a)
        return x + F.linear(a, self.p(l, "mlp.down_proj"))

    def embed(self, ids):
        return F.embedding(ids, self.w["model.embed_tokens.weight"])

    def logits(self, x):
        h = F.rms_norm(x, (x.shape[-1],), self.w["model.norm.weight"], self.eps)
        head = self.w.get("lm_head.weight", self.w["model.embed_tokens.weight"])
        return F.linear(h, head)


@torch.inference_mode()
def perplexity(model, windows, batch):
    total, count = 0.0, 0
    for s in range(0, len(windows), batch):
        ids = windows[s : s + batch]
        x = model.embed(ids)
        for l in range(model.layers):
            x = model.block(l, x)
        logits = model.logits(x)[:, :-1]
        nll = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1), reduction="sum")
        total += nll.item()
        count += ids[:, 1:].numel()
    return math.exp(total / count)


INPUTS = {
    "self_attn.q_proj": "attn",
    "self_attn.k_proj": "attn",
    "self_attn.v_proj": "attn",
    "self_attn.o_proj": "o",
    "mlp.gate_proj": "mlp",
    "mlp.up_proj": "mlp",
    "mlp.down_proj": "down",
}


@torch.inference_mode()
def wanda(model, calib, batch, n, m):
    """Sequential Wanda (Sun et al.): per block, column norms of each linear
    input over the calibration set, |W| * ||X_j|| compared within groups of m
    inputs, the n lowest of each group pruned; the next block reads the pruned block's
    outputs."""
    chunks = [model.embed(calib[s : s + batch]) for s in range(0, len(calib), batch)]
    for l in range(model.layers):
        sq = {}

        def sink(key, a):
            s = a.reshape(-1, a.shape[-1]).double().pow(2).sum(0)
            sq[key] = sq[key] + s if key in sq else s

        for x in chunks:
            model.block(l, x, sink)
        for name, key in INPUTS.items():
            w = model.p(l, name)
            score = w.abs() * sq[key].sqrt().float()
            groups = score.view(w.shape[0], -1, m)
            drop = groups.topk(n, dim=-1, largest=False).indices
            mask = torch.ones_like(groups, dtype=torch.bool).scatter_(-1, drop, False)
            w.mul_(mask.view_as(w))
        chunks = [model.block(l, x) for x in chunks]


def llm(args):
    with open(args.tokens) as f:
        tokens = json.load(f)
    model = Llama(args.model)
    evals = torch.tensor(tokens["eval"], dtype=torch.long)
    calib = torch.tensor(tokens["calib"], dtype=torch.long)
    # Warm-up on one window, then the timed runs.
    perplexity(model, evals[:1], 1)
    t0 = time.perf_counter()
    ppl = perplexity(model, evals, args.eval_batch)
    emit(case="perplexity", items=evals.numel(), seconds=time.perf_counter() - t0, perplexity=ppl)
    keep, m = (int(v) for v in args.pattern.split(":"))
    t0 = time.perf_counter()
    wanda(model, calib, args.calib_batch, m - keep, m)
    seconds = time.perf_counter() - t0
    emit(case="wanda", items=calib.numel(), seconds=seconds, perplexity=perplexity(model, evals, args.eval_batch))


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    sub = ap.add_subparsers(dest="what", required=True)
    t = sub.add_parser("train")
    t.add_argument("--mnist", required=True)
    t.add_argument("--models", default="lenet300,lenet5")
    t.add_argument("--samples", type=int, default=60000)
    t.add_argument("--batch", type=int, default=128)
    t.add_argument("--lr", type=float, default=0.05)
    t.add_argument("--momentum", type=float, default=0.9)
    t.add_argument("--weight-decay", type=float, default=1e-4)
    g = sub.add_parser("llm")
    g.add_argument("--model", required=True, help="safetensors folder written by prunec")
    g.add_argument("--tokens", required=True, help="JSON with eval and calib windows")
    g.add_argument("--eval-batch", type=int, default=8)
    g.add_argument("--calib-batch", type=int, default=8)
    g.add_argument("--pattern", default="2:4")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    emit(case="torch", version=torch.__version__, threads=torch.get_num_threads())
    train(args) if args.what == "train" else llm(args)


if __name__ == "__main__":
    main()
