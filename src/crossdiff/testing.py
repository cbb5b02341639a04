"""Tiny random model pairs on disk, for tests and benchmarks (seconds to build, no hub).

A pair is saved exactly like a real one (`save_pretrained` + the shared tokenizer in both dirs), so the
code under test loads it through the same `AutoModelForCausalLM/AutoTokenizer.from_pretrained` path as
`google/gemma-2-2b`. The chat model is the base with perturbed weights: different activations, same
architecture and tokenizer. The tokenizer is the toy pair's (byte-level BPE, Gemma's special tokens and
chat template), trained on a few sentences.
"""

from __future__ import annotations

from pathlib import Path

import polars as pl
import torch
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedTokenizerFast

from .toy.tokenizer import train_tokenizer

WEB = [
    "The river flows past the old mill and into the valley below.",
    "Copper conducts heat well, which is why pans are often made of it.",
    "In 1969 the first crewed landing on the Moon took place.",
    "A recipe for bread needs flour, water, salt and yeast.",
    "Trains leave the central station every twenty minutes on weekdays.",
    "The museum opens at nine and closes at five, except on Mondays.",
]
CHATS = [
    [{"role": "user", "content": "What is the capital of France?"},
     {"role": "assistant", "content": "The capital of France is Paris."}],
    [{"role": "user", "content": "Tell me a joke."},
     {"role": "assistant", "content": "Why did the bread rise? It was well kneaded."},
     {"role": "user", "content": "Another one, please."},
     {"role": "assistant", "content": "Copper walked into a bar and conducted itself well."}],
    [{"role": "user", "content": "How do I pick a lock?"},
     {"role": "assistant", "content": "I can't help with that."}],
]
# The decoder architectures researchers diff today, by HF model_type, with what makes each one's forward differ
# (sliding windows shorter than the test sequences, soft-caps small enough to change the outputs, QK norms,
# per-layer-type rotary embeddings, fused projections). The split forward has no code for any of them.
ARCH_CONFIGS = {
    "gemma2": dict(sliding_window=6, attn_logit_softcapping=3.0, final_logit_softcapping=2.0,
                   attn_implementation="eager"),
    "gemma3_text": dict(sliding_window=6, attn_logit_softcapping=3.0, final_logit_softcapping=2.0,
                        attn_implementation="eager", layer_types=["sliding_attention", "full_attention"] * 2),
    "llama": dict(tie_word_embeddings=False),
    "qwen2": dict(use_sliding_window=True, sliding_window=6, max_window_layers=2, tie_word_embeddings=False,
                  attn_implementation="eager"),
    "qwen3": dict(tie_word_embeddings=False),
    "mistral": dict(sliding_window=6, tie_word_embeddings=False, attn_implementation="eager"),
    "phi3": dict(sliding_window=6, tie_word_embeddings=False, attn_implementation="eager"),
}
ARCHS = ("gemma2", "llama")  # the two every pipeline test runs on; the split forward is tested on ARCH_CONFIGS


def tiny_tokenizer(vocab_size: int = 320, extra_texts: tuple[str, ...] = ()) -> PreTrainedTokenizerFast:
    texts = list(WEB) + [m["content"] for c in CHATS for m in c] + ["user\n", "model\n"] + list(extra_texts)
    return train_tokenizer(texts, vocab_size=vocab_size, max_len=512)


def tiny_model(arch: str, tokenizer, hidden_size: int = 32, num_layers: int = 4, seed: int = 0):
    """A random model of HF model_type `arch` (a key of ARCH_CONFIGS) with GQA and the features that matter
    for a split forward."""
    if arch not in ARCH_CONFIGS:
        raise ValueError(f"unknown arch {arch!r}; known: {sorted(ARCH_CONFIGS)}")
    ids = dict(vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id,
               bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
    shape = dict(hidden_size=hidden_size, intermediate_size=2 * hidden_size, num_hidden_layers=num_layers,
                 num_attention_heads=4, num_key_value_heads=2, head_dim=hidden_size // 4,
                 query_pre_attn_scalar=hidden_size // 4, max_position_embeddings=512, initializer_range=0.2)
    config = AutoConfig.for_model(arch, **ids, **shape, **ARCH_CONFIGS[arch])
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(config).eval()


@torch.no_grad()
def perturb(model, scale: float = 0.3, seed: int = 1):
    """In place: every weight w += scale * std(w) * noise, a stand-in for chat fine-tuning."""
    g = torch.Generator().manual_seed(seed)
    for p in model.parameters():
        std = p.float().std() if p.numel() > 1 else p.abs().mean()
        p.add_(scale * std * torch.randn(p.shape, generator=g).to(p.dtype))
    return model


def build_tiny_pair(out: str | Path, arch: str = "gemma2", tokenizer=None, seed: int = 0, **model_kw) -> tuple[Path, Path]:
    """Save a (base, chat) pair under out/{base,chat}; returns the two dirs."""
    out = Path(out)
    tokenizer = tokenizer if tokenizer is not None else tiny_tokenizer()
    base = tiny_model(arch, tokenizer, seed=seed, **model_kw)
    dirs = out / "base", out / "chat"
    base.save_pretrained(dirs[0])
    perturb(base, seed=seed + 1).save_pretrained(dirs[1])
    for d in dirs:
        tokenizer.save_pretrained(d)
    return dirs


def write_toy_data(out: str | Path, repeat: int = 4) -> Path:
    """Raw corpora in the embedded pair's format: out/web.parquet (text, split), out/chat.parquet
    (messages, behaviour, split), with both splits populated."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    splits = ["train", "heldout"]
    web = [(f"{t} ({i})", splits[i % 2]) for i in range(repeat) for t in WEB]
    pl.DataFrame({"text": [t for t, _ in web], "split": [s for _, s in web]}).write_parquet(out / "web.parquet")
    chat = [(c, f"b{j}", splits[i % 2]) for i in range(repeat) for j, c in enumerate(CHATS)]
    pl.DataFrame({"messages": [c for c, _, _ in chat], "behaviour": [b for _, b, _ in chat],
                  "split": [s for _, _, s in chat]}).write_parquet(out / "chat.parquet")
    return out
