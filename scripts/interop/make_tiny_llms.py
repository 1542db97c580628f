#!/usr/bin/env python3
"""Generates the tiny random causal LMs under tests/models/ and their reference logits.

One checkpoint per architecture prunec reads, each exercising what sets it apart:
  tiny-llama    LlamaForCausalLM, untied lm_head, f32, one model.safetensors
  tiny-mistral  MistralForCausalLM, tied, sliding window shorter than the sequence
  tiny-qwen2    Qwen2ForCausalLM, q/k/v biases, tied
  tiny-qwen3    Qwen3ForCausalLM, q/k head norms, head_dim != hidden/heads,
                bf16 weights in several shards with an index
Every folder gets a small BPE tokenizer.json trained on tests/models/tiny.txt, and
reference.safetensors: `ids` (2 x 24 token ids) and `logits` (2 x 24 x vocab) computed
by transformers in f32 (bf16 weights widened to f32, as prunec computes).

Run: .venv-interop/bin/python scripts/interop/make_tiny_llms.py  (scripts/interop.sh makes the venv)
"""
import pathlib
import shutil

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


def text():
    """A small deterministic English-like corpus (also the run tests' data)."""
    words = ("the model keeps a sparse mask of weights while every layer reads its "
             "calibration data and the pruned network still predicts the next token "
             "from a short window of text so tests stay quick").split()
    lines = []
    for i in range(400):
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


ROOT.mkdir(parents=True, exist_ok=True)
CORPUS = text()
(ROOT / "tiny.txt").write_text(CORPUS)
TOK = tokenizer(CORPUS)
assert TOK.get_vocab_size() <= VOCAB, TOK.get_vocab_size()
build("tiny-llama", transformers.LlamaConfig, transformers.LlamaForCausalLM, 11,
      tie_word_embeddings=False)
build("tiny-mistral", transformers.MistralConfig, transformers.MistralForCausalLM, 12,
      tie_word_embeddings=True, sliding_window=8)
build("tiny-qwen2", transformers.Qwen2Config, transformers.Qwen2ForCausalLM, 13,
      tie_word_embeddings=True)
build("tiny-qwen3", transformers.Qwen3Config, transformers.Qwen3ForCausalLM, 14,
      dtype=torch.bfloat16, shard="20KB", tie_word_embeddings=False, head_dim=16)
