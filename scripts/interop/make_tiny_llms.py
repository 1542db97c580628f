#!/usr/bin/env python3
"""Generates the tiny random causal LMs under tests/models/ and their reference logits.

One checkpoint per architecture prunec reads, each exercising what sets it apart:
  tiny-llama    LlamaForCausalLM, untied lm_head, f32, one model.safetensors
  tiny-mistral  MistralForCausalLM, tied, sliding window shorter than the sequence
  tiny-qwen2    Qwen2ForCausalLM, q/k/v biases, tied
  tiny-qwen3    Qwen3ForCausalLM, q/k head norms, head_dim != hidden/heads,
                bf16 weights in several shards with an index
  tiny-qwen3-moe  Qwen3MoeForCausalLM: 8 experts of 16, top-2 renormalised,
                blocks 0 and 2 sparse, block 1 a dense MLP (mlp_only_layers)
  tiny-mixtral  MixtralForCausalLM: 8 experts of 16 in both blocks, top-2,
                tied, sliding window 12 (shorter than the reference's 24)
  tiny-qwen3-moe-trained  Qwen3MoeForCausalLM, 16 experts of 16, top-2, 3 sparse
                blocks, trained (AdamW, seeded) on lines 400..8400 of the corpus's
                generator (tiny.txt holds lines 0..400), so that pruning it
                has a measurable cost: examples/llm_moe.prune compares the
                expert scores on it
Every folder gets a small BPE tokenizer.json trained on tests/models/tiny.txt, and
reference.safetensors: `ids` (2 x 24 token ids) and `logits` (2 x 24 x vocab) computed
by transformers in f32 (bf16 weights widened to f32, as prunec computes). The
mixture-of-experts models' references also hold, computed in f64 from transformers'
own forward and backward on `ids` (mean next-token loss), for every sparse block L:
  `L.frequency` (experts): tokens routed to each expert (top-k);
  `L.reap` (experts): mean over its tokens of routing weight x ||expert output||;
  `L.heapr` (experts x width): HEAPr's atomic-expert importance
      1/2 * mean_t(a_ti^2) * sum_t (w_te * d_i . g_t)^2,
      a = silu(gate x) * up x, d_i column i of down, w the routing weight,
      g_t the loss gradient at the block's output, t over the expert's tokens;
  `L.heapr_expert` (experts): the same term for the expert's whole output o_t,
      1/2 * sum_t (w_te * o_t . g_t)^2;
and `pruned_logits`: the logits with experts 1 and 6 of every sparse block removed
(router rows and experts dropped, num_experts = 6).

Run: .venv-interop/bin/python scripts/interop/make_tiny_llms.py [NAME ...]
(all models when no name is given; scripts/interop.sh makes the venv)
"""
import copy
import pathlib
import shutil
import sys

import torch
import transformers
from safetensors.torch import save_file
from tokenizers import Tokenizer, models, pre_tokenizers, decoders, trainers

ROOT = pathlib.Path(__file__).resolve().parents[2] / "tests" / "models"
VOCAB = 128
COMMON = dict(
    vocab_size=VOCAB,
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=64,
    rms_norm_eps=1e-6,
    bos_token_id=1,
    eos_token_id=2,
)


def text(first=0, count=400):
    """A small deterministic English-like corpus (also the run tests' data);
    lines `first..first + count` of its generator."""
    words = ("the model keeps a sparse mask of weights while every layer reads its "
             "calibration data and the pruned network still predicts the next token "
             "from a short window of text so tests stay quick").split()
    lines = []
    for i in range(first, first + count):
        n = 6 + (i * 7) % 9
        lines.append(" ".join(words[(i * 13 + j * (i % 5 + 1)) % len(words)] for j in range(n)) + ".")
    return "\n".join(lines) + "\n"


def tokenizer(corpus: str) -> Tokenizer:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB,
        special_tokens=["<unk>", "<s>", "</s>"],
        initial_alphabet=sorted(set(pre_tokenizers.ByteLevel.alphabet()) & set(
            "".join(c for c in corpus if c.isalpha()) + "ĠĊ.")),
        show_progress=False,
    )
    tok.train_from_iterator([corpus], trainer)
    return tok


def randomize(model, seed):
    """Weights far from the default init so norms, biases and heads all matter."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in sorted(model.named_parameters()):
            if name.endswith("norm.weight"):
                p.copy_(1.0 + 0.2 * torch.randn(p.shape, generator=g))
            elif name.endswith("bias"):
                p.copy_(0.3 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(0.25 * torch.randn(p.shape, generator=g))


def build(name, config_cls, model_cls, seed, dtype=torch.float32, shard=None, **extra):
    out = ROOT / name
    if out.exists():
        shutil.rmtree(out)
    config = config_cls(**{**COMMON, **extra})
    config._attn_implementation = "eager"
    torch.manual_seed(seed)
    model = model_cls(config).eval()
    randomize(model, seed)
    model = model.to(dtype)
    kwargs = {"max_shard_size": shard} if shard else {}
    model.save_pretrained(out, **kwargs)
    TOK.save(str(out / "tokenizer.json"))
    # Reference: the saved weights (bf16 stays bf16-rounded), computed in f32.
    ref = model_cls.from_pretrained(out, dtype=torch.float32, attn_implementation="eager").eval()
    g = torch.Generator().manual_seed(seed + 1)
    ids = torch.randint(0, VOCAB, (2, 24), generator=g)
    with torch.no_grad():
        logits = ref(input_ids=ids).logits.float()
    save_file({"ids": ids.to(torch.int64).contiguous(), "logits": logits.contiguous()},
              str(out / "reference.safetensors"))
    print(f"{name}: {sum(p.numel() for p in model.parameters())} parameters, {dtype}")


def moe_reference(out, model, ids):
    """Routing statistics, HEAPr importances and the logits with two experts
    removed, from transformers' forward and backward (see the docstring)."""
    model = model.double()
    blocks = [(l, layer.mlp) for l, layer in enumerate(model.model.layers)
              if hasattr(layer.mlp, "experts")]
    seen = {}

    def hook(l):
        def f(module, inputs, output):
            y = output[0] if isinstance(output, tuple) else output
            y.retain_grad()
            seen[l] = (inputs[0].detach(), y)
        return f

    handles = [mlp.register_forward_hook(hook(l)) for l, mlp in blocks]
    logits = model(input_ids=ids).logits
    loss = torch.nn.functional.cross_entropy(
        logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))
    loss.backward()
    for h in handles:
        h.remove()
    c = model.config
    n_experts = getattr(c, "num_experts", None) or c.num_local_experts
    width = getattr(c, "moe_intermediate_size", None) or c.intermediate_size
    norm = getattr(c, "norm_topk_prob", True)
    tensors = {}
    for l, mlp in blocks:
        x, y = seen[l]
        x = x.reshape(-1, x.shape[-1])
        g = y.grad.reshape(-1, y.shape[-1])
        probs = torch.softmax(x @ mlp.gate.weight.T, dim=-1)
        w, idx = torch.topk(probs, c.num_experts_per_tok, dim=-1)
        if norm:
            w = w / w.sum(dim=-1, keepdim=True)
        recomputed = torch.zeros_like(x)
        freq, reap, heapr, heapr_expert = [], [], [], []
        for e in range(n_experts):
            gate_up = mlp.experts.gate_up_proj[e]
            gate, up, down = gate_up[:width], gate_up[width:], mlp.experts.down_proj[e]
            rows, slot = torch.nonzero(idx == e, as_tuple=True)
            we = w[rows, slot].unsqueeze(1)
            a = torch.nn.functional.silu(x[rows] @ gate.T) * (x[rows] @ up.T)
            o = a @ down.T
            recomputed.index_add_(0, rows, we * o)
            n = len(rows)
            freq.append(float(n))
            reap.append(float((we.squeeze(1) * o.norm(dim=1)).sum().detach() / max(n, 1)))
            proj = (we * g[rows]) @ down
            mean_a2 = (a * a).sum(0) / max(n, 1)
            heapr.append(0.5 * mean_a2 * (proj * proj).sum(0))
            whole = (we * g[rows] * o).sum(1)
            heapr_expert.append(float(0.5 * (whole * whole).sum().detach()))
        # transformers takes the routing softmax in f32: agreement to ~1e-7.
        assert torch.allclose(recomputed, y.reshape(recomputed.shape), atol=1e-5), l
        tensors[f"{l}.frequency"] = torch.tensor(freq, dtype=torch.float64)
        tensors[f"{l}.reap"] = torch.tensor(reap, dtype=torch.float64)
        tensors[f"{l}.heapr"] = torch.stack(heapr).detach()
        tensors[f"{l}.heapr_expert"] = torch.tensor(heapr_expert, dtype=torch.float64)
    # Experts 1 and 6 removed from every sparse block.
    keep = [e for e in range(n_experts) if e not in (1, 6)]
    small_config = copy.deepcopy(c)
    if hasattr(c, "num_experts"):
        small_config.num_experts = len(keep)
    else:
        small_config.num_local_experts = len(keep)
    small_config._attn_implementation = "eager"
    small_config._experts_implementation = "eager"
    small = type(model)(small_config).double().eval()
    state = model.state_dict()
    for l, _ in blocks:
        p = f"model.layers.{l}.mlp."
        state[p + "gate.weight"] = state[p + "gate.weight"][keep]
        state[p + "experts.gate_up_proj"] = state[p + "experts.gate_up_proj"][keep]
        state[p + "experts.down_proj"] = state[p + "experts.down_proj"][keep]
    small.load_state_dict(state)
    with torch.no_grad():
        tensors["pruned_logits"] = small(input_ids=ids).logits.float()
    return tensors


def build_moe(name, seed, mixtral=False):
    out = ROOT / name
    if out.exists():
        shutil.rmtree(out)
    if mixtral:
        cls = transformers.MixtralForCausalLM
        config = transformers.MixtralConfig(**{**COMMON, "intermediate_size": 16},
                                            num_local_experts=8, num_experts_per_tok=2,
                                            sliding_window=12, tie_word_embeddings=True)
    else:
        cls = transformers.Qwen3MoeForCausalLM
        config = transformers.Qwen3MoeConfig(**{**COMMON, "num_hidden_layers": 3},
                                             head_dim=16, num_experts=8, num_experts_per_tok=2,
                                             moe_intermediate_size=16, norm_topk_prob=True,
                                             decoder_sparse_step=1, mlp_only_layers=[1],
                                             tie_word_embeddings=False)
    config._attn_implementation = "eager"
    torch.manual_seed(seed)
    model = cls(config).eval()
    randomize(model, seed)
    model.save_pretrained(out)
    TOK.save(str(out / "tokenizer.json"))
    ref = cls.from_pretrained(
        out, dtype=torch.float32, attn_implementation="eager",
        experts_implementation="eager").eval()
    g = torch.Generator().manual_seed(seed + 1)
    ids = torch.randint(0, VOCAB, (2, 24), generator=g)
    with torch.no_grad():
        logits = ref(input_ids=ids).logits.float()
    tensors = {"ids": ids.to(torch.int64).contiguous(), "logits": logits.contiguous()}
    tensors.update(moe_reference(out, ref, ids))
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(out / "reference.safetensors"))
    print(f"{name}: {sum(p.numel() for p in model.parameters())} parameters")


def build_moe_trained(name, seed, steps=600):
    out = ROOT / name
    if out.exists():
        shutil.rmtree(out)
    config = transformers.Qwen3MoeConfig(**{**COMMON, "num_hidden_layers": 3, "hidden_size": 48,
                                            "num_attention_heads": 4, "num_key_value_heads": 2},
                                         head_dim=16, num_experts=16, num_experts_per_tok=2,
                                         moe_intermediate_size=16, norm_topk_prob=True,
                                         tie_word_embeddings=True)
    config._attn_implementation = "eager"
    config._experts_implementation = "eager"
    torch.manual_seed(seed)
    model = transformers.Qwen3MoeForCausalLM(config)
    ids = torch.tensor(TOK.encode(text(400, 8000)).ids)
    seq, batch = 32, 32
    windows = ids[: len(ids) // seq * seq].view(-1, seq)
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    model.train()
    for step in range(steps):
        pick = torch.randint(0, len(windows), (batch,), generator=g)
        loss = model(input_ids=windows[pick], labels=windows[pick]).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        if step % 100 == 0 or step == steps - 1:
            print(f"{name}: step {step} loss {loss.item():.3f}")
    model.eval()
    model.save_pretrained(out)
    TOK.save(str(out / "tokenizer.json"))
    print(f"{name}: {sum(p.numel() for p in model.parameters())} parameters")


ROOT.mkdir(parents=True, exist_ok=True)
CORPUS = text()
(ROOT / "tiny.txt").write_text(CORPUS)
TOK = tokenizer(CORPUS)
assert TOK.get_vocab_size() <= VOCAB, TOK.get_vocab_size()
WANTED = set(sys.argv[1:])


def wanted(name):
    return not WANTED or name in WANTED


if wanted("tiny-llama"):
    build("tiny-llama", transformers.LlamaConfig, transformers.LlamaForCausalLM, 11,
          tie_word_embeddings=False)
if wanted("tiny-mistral"):
    build("tiny-mistral", transformers.MistralConfig, transformers.MistralForCausalLM, 12,
          tie_word_embeddings=True, sliding_window=8)
if wanted("tiny-qwen2"):
    build("tiny-qwen2", transformers.Qwen2Config, transformers.Qwen2ForCausalLM, 13,
          tie_word_embeddings=True)
if wanted("tiny-qwen3"):
    build("tiny-qwen3", transformers.Qwen3Config, transformers.Qwen3ForCausalLM, 14,
          dtype=torch.bfloat16, shard="20KB", tie_word_embeddings=False, head_dim=16)
if wanted("tiny-qwen3-moe"):
    build_moe("tiny-qwen3-moe", 15)
if wanted("tiny-mixtral"):
    build_moe("tiny-mixtral", 17, mixtral=True)
if wanted("tiny-qwen3-moe-trained"):
    build_moe_trained("tiny-qwen3-moe-trained", 16)
