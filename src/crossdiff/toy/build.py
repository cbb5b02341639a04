"""Build the embedded default pair: corpora, tokenizer, a tiny Gemma 2 base and its chat-tuned copy.

Output layout (what `AutoModelForCausalLM/AutoTokenizer.from_pretrained` and later stages read):
    {out}/base/, {out}/chat/     save_pretrained model (safetensors) + the shared tokenizer
    {out}/data/web.parquet       text, split (train|heldout)
    {out}/data/chat.parquet      messages (list of {role, content}), behaviour, answer, kind, split
    {out}/metrics.json           training losses, throughput and time (the evaluate_pair stage, toy.pair_eval,
                                 measures the pair: held-out losses and per-behaviour success, base vs chat)
The whole directory is built next to `out` and renamed onto it at the end (atomic for readers).
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import logging
import math
import os
import shutil
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import polars as pl
import torch
from tqdm import tqdm
from transformers import Gemma2Config, Gemma2ForCausalLM, GenerationConfig

from .. import io
from ..cli import job_threads, seed_everything
from . import corpus
from .evaluate import Row, collate, target_loss
from .tokenizer import END, assistant_labels, train_tokenizer, training_texts

log = logging.getLogger(__name__)


def staging_dir(out: Path) -> Path:
    """An empty `.{out}.partial` next to `out`, where a pair is built before `publish` renames it into place."""
    tmp = out.parent / f".{out.name}.partial"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    return tmp


def publish(tmp: Path, out: Path, metrics: dict) -> None:
    """Write the pair's metrics.json and rename the finished directory onto `out` (atomic for readers)."""
    io.write_json(tmp / "metrics.json", metrics)
    if out.exists():
        shutil.rmtree(out)
    os.replace(tmp, out)


def checked_dataclass(cls, d: Mapping[str, Any], section: str):
    """`cls(**d)`, refusing keys the params section `section` does not have (with the known ones listed)."""
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - known)
    if unknown:
        raise ValueError(f"unknown {section} params {unknown}; known: {sorted(known)}")
    return cls(**d)


@dataclass(frozen=True)
class ToyConfig:
    """The `toy:` section of params.yaml (defaults = params.yaml)."""

    seed: int = 0
    web_docs: int = 14000
    chat_convs: int = 8000
    heldout_frac: float = 0.1
    multi_turn_frac: float = 0.2
    vocab_size: int = 2048
    hidden_size: int = 128
    num_layers: int = 4
    num_heads: int = 4
    intermediate_size: int = 512
    max_len: int = 128
    pretrain_steps: int = 700
    finetune_steps: int = 1000
    batch_size: int = 32
    lr: float = 3e-3
    finetune_lr: float = 1.5e-3
    finetune_web_frac: float = 0.1  # share of fine-tuning batches that are web text (limits forgetting)
    threads: int = 0  # torch threads; 0 = all available cores
    train_dtype: str = "bfloat16"  # matmul precision while training (autocast; weights stay float32)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> ToyConfig:
        cfg = checked_dataclass(cls, d, "toy")
        resolve_train_dtype(cfg.train_dtype, "toy")
        if cfg.hidden_size % cfg.num_heads:
            raise ValueError(f"toy.hidden_size ({cfg.hidden_size}) must be divisible by toy.num_heads ({cfg.num_heads})")
        if not 0 <= cfg.finetune_web_frac < 1:
            raise ValueError(f"toy.finetune_web_frac must be in [0, 1), got {cfg.finetune_web_frac}")
        return cfg

    @property
    def context(self) -> int:
        """Positions the model supports: room for prompts of max_len plus generated responses."""
        return 4 * self.max_len


def model_config(cfg: ToyConfig, tokenizer) -> Gemma2Config:
    head_dim = cfg.hidden_size // cfg.num_heads
    return Gemma2Config(
        vocab_size=len(tokenizer),
        hidden_size=cfg.hidden_size,
        intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_heads,
        num_key_value_heads=cfg.num_heads,
        head_dim=head_dim,
        query_pre_attn_scalar=head_dim,
        max_position_embeddings=cfg.context,
        sliding_window=cfg.context,  # >= every sequence: local and global layers attend alike
        attn_logit_softcapping=50.0,  # Gemma 2's soft-caps (eager attention implements both)
        final_logit_softcapping=30.0,
        tie_word_embeddings=True,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        attn_implementation="eager",  # Gemma 2 has no SDPA path in transformers 5
    )


def web_rows(tokenizer, texts: Sequence[str], max_len: int) -> list[Row]:
    """`<bos> text <eos>`, truncated to max_len; every token is a target."""
    rows = []
    for ids in tokenizer(list(texts), truncation=True, max_length=max_len - 1)["input_ids"]:
        ids = ids + [tokenizer.eos_token_id]
        rows.append((ids, [True] * len(ids)))
    return rows


def chat_rows(tokenizer, conversations: Sequence[Sequence[dict]], max_len: int) -> list[Row]:
    """Rendered conversations; targets = assistant turns only (tokenizer.assistant_labels)."""
    rows = []
    for msgs in conversations:
        ids, mask = assistant_labels(tokenizer, msgs)
        rows.append((ids[:max_len], mask[:max_len]))
    return rows


def resolve_train_dtype(name: str, section: str) -> torch.dtype:
    """`auto` = bfloat16 where this CPU multiplies it natively (avx512_bf16 / AMX), else float32 (emulated
    bfloat16 is slower than float32, with the same rounding)."""
    if name == "auto":
        return torch.bfloat16 if native_bf16() else torch.float32
    if name not in ("bfloat16", "float32"):
        raise ValueError(f"{section}.train_dtype must be auto, bfloat16 or float32, got {name!r}")
    return getattr(torch, name)


def native_bf16() -> bool:
    return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())


def _optimizer(model, lr: float) -> torch.optim.Optimizer:
    trainable = [p for p in model.parameters() if p.requires_grad]  # all, or only adapters (crossdiff.lora)
    decay = [p for p in trainable if p.dim() >= 2]  # nanoGPT: no decay on norms
    rest = [p for p in trainable if p.dim() < 2]
    return torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": rest, "weight_decay": 0.0}],
                             lr=lr, betas=(0.9, 0.95))


def _lr_factor(step: int, steps: int, warmup: int) -> float:
    """Linear warm-up, then cosine decay to 10%."""
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - warmup)
    return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress))


class _Batches:
    """Endless length-bucketed batches of one source, in a seeded order.

    Each epoch is a seeded permutation; windows of 50 batches are sorted by length before being cut
    into batches, so a batch pads to a similar length (CPU time goes to tokens, not padding), and the
    batches are then shuffled.
    """

    def __init__(self, rows: Sequence[Row], batch_size: int, generator: torch.Generator, window: int = 50):
        if not rows:
            raise ValueError("no training rows")
        self.rows, self.bs, self.g, self.window = rows, batch_size, generator, window
        self.queue: list[list[int]] = []

    def _epoch(self) -> list[list[int]]:
        order = torch.randperm(len(self.rows), generator=self.g).tolist()
        batches = []
        for w in range(0, len(order), self.bs * self.window):
            chunk = sorted(order[w : w + self.bs * self.window], key=lambda i: len(self.rows[i][0]))
            batches += [chunk[i : i + self.bs] for i in range(0, len(chunk), self.bs)]
        return [batches[i] for i in torch.randperm(len(batches), generator=self.g).tolist()]

    def next(self) -> list[Row]:
        if not self.queue:
            self.queue = self._epoch()
        return [self.rows[i] for i in self.queue.pop()]


# The toy's batches pad to a multiple of 16 positions: oneDNN keeps a bf16 kernel per matmul shape, and one
# shape per sequence length grew the build's RSS from 1.4 to 4.3 GB (2.6 GB after 300 steps; 1.4 GB padded).
PAD_MULTIPLE = 16


def train(model, sources: Sequence[tuple[Sequence[Row], float]], steps: int, batch_size: int, lr: float,
          seed: int, pad_id: int, desc: str, loss_fn=target_loss, autocast: torch.dtype | None = None,
          pad_multiple: int = 1) -> dict:
    """AdamW on the trainable parameters, batches drawn from `(rows, weight)` sources (a whole batch per draw,
    so each batch is length-bucketed within one source). `loss_fn(model, ids, att, labels)` is the mean
    cross-entropy over target positions (HF's causal-LM loss, with the vocabulary head run at targets only);
    `autocast` (e.g. bfloat16) runs its matmuls in that precision, with float32 weights and optimizer; batches
    pad to a multiple of `pad_multiple` positions. Returns the loss curve and the tokens seen.
    """
    g = torch.Generator().manual_seed(seed)
    streams = [_Batches(rows, batch_size, g) for rows, w in sources if w > 0]
    weights = torch.tensor([w for _, w in sources if w > 0], dtype=torch.float)
    opt = _optimizer(model, lr)
    warmup = max(1, steps // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: _lr_factor(s, steps, warmup))
    model.train()
    losses, tokens = [], 0
    bar = tqdm(range(steps), desc=desc, mininterval=2.0)
    for _ in bar:
        ids, att, labels = collate(streams[int(torch.multinomial(weights, 1, generator=g))].next(), pad_id,
                                   multiple=pad_multiple)
        with torch.autocast(ids.device.type, dtype=autocast or torch.float32, enabled=autocast is not None):
            loss = loss_fn(model, ids, att, labels)
        loss.backward()
        torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
        tokens += int(att.sum())
        bar.set_postfix(loss=f"{losses[-1]:.3f}", refresh=False)
    model.eval()
    return {"losses": losses, "tokens": tokens}


def write_corpora(data_dir: Path, cfg: ToyConfig) -> tuple[pl.DataFrame, pl.DataFrame]:
    web, chat = corpus.generate(cfg.seed, cfg.web_docs, cfg.chat_convs, cfg.heldout_frac, cfg.multi_turn_frac)
    io.write_parquet(data_dir / "web.parquet", web)
    io.write_parquet(data_dir / "chat.parquet", chat)
    return web, chat


def build_tokenizer(cfg: ToyConfig, web: pl.DataFrame, chat: pl.DataFrame):
    """BPE trained on the training split only (held-out text stays unseen everywhere)."""
    texts = training_texts(
        web.filter(pl.col("split") == "train")["text"].to_list(),
        chat.filter(pl.col("split") == "train")["messages"].to_list(),
    )
    return train_tokenizer(texts, cfg.vocab_size, cfg.context)


def _save(model, tokenizer, path: Path, stop_ids: list[int]) -> None:
    model.generation_config = GenerationConfig(
        bos_token_id=tokenizer.bos_token_id, eos_token_id=stop_ids, pad_token_id=tokenizer.pad_token_id
    )
    model.save_pretrained(path)  # safetensors
    tokenizer.save_pretrained(path)


def build_pair(out_dir: str | os.PathLike, params: Mapping[str, Any] | ToyConfig | None = None) -> dict:
    """Build the whole toy pair into `out_dir` (layout in the module docstring); returns the metrics.

    `params` is the `toy:` section of params.yaml (a dict, possibly partial) or a ToyConfig.
    """
    cfg = params if isinstance(params, ToyConfig) else ToyConfig.from_dict(params or {})
    out = Path(out_dir)
    tmp = staging_dir(out)
    torch.set_num_threads(cfg.threads or job_threads())
    seed_everything(cfg.seed)
    timings, t0, cpu0 = {}, time.perf_counter(), time.process_time()

    web, chat = write_corpora(tmp / "data", cfg)
    tokenizer = build_tokenizer(cfg, web, chat)
    timings["corpus_tokenizer"] = time.perf_counter() - t0
    split = {s: (web.filter(pl.col("split") == s), chat.filter(pl.col("split") == s)) for s in ("train", "heldout")}
    web_train = web_rows(tokenizer, split["train"][0]["text"].to_list(), cfg.max_len)
    chat_train = chat_rows(tokenizer, split["train"][1]["messages"].to_list(), cfg.max_len)
    pad = tokenizer.pad_token_id
    stop_ids = [tokenizer.eos_token_id, tokenizer.convert_tokens_to_ids(END)]
    dtype = resolve_train_dtype(cfg.train_dtype, "toy")
    if dtype == torch.bfloat16 and not native_bf16():
        log.warning("toy.train_dtype bfloat16 runs emulated on this CPU (slower than float32, rounded as on CPUs "
                    "with bf16 units); float32 is faster here but trains a different pair")
    run = functools.partial(train, pad_id=pad, autocast=dtype if dtype != torch.float32 else None,
                            pad_multiple=PAD_MULTIPLE)

    t = time.perf_counter()
    base = Gemma2ForCausalLM(model_config(cfg, tokenizer))
    n_params = sum(p.numel() for p in base.parameters())
    log.info("toy base: %d parameters, %d web / %d chat training rows, %s matmuls", n_params, len(web_train),
             len(chat_train), dtype)
    pre = run(base, [(web_train, 1.0)], cfg.pretrain_steps, cfg.batch_size, cfg.lr, cfg.seed, desc="pretrain base")
    timings["pretrain"] = time.perf_counter() - t

    t = time.perf_counter()
    chat_model = copy.deepcopy(base)
    ft = run(chat_model, [(chat_train, 1 - cfg.finetune_web_frac), (web_train, cfg.finetune_web_frac)],
             cfg.finetune_steps, cfg.batch_size, cfg.finetune_lr, cfg.seed + 1, desc="fine-tune chat")
    timings["finetune"] = time.perf_counter() - t

    _save(base, tokenizer, tmp / "base", [tokenizer.eos_token_id])
    _save(chat_model, tokenizer, tmp / "chat", stop_ids)

    timings["total"] = time.perf_counter() - t0
    timings["cpu_total"] = time.process_time() - cpu0  # robust to other jobs on a shared machine

    metrics = {
        "train": {name: {"final_loss": sum(r["losses"][-20:]) / len(r["losses"][-20:]), "tokens": r["tokens"],
                         "tokens_per_s": r["tokens"] / timings[name]} for name, r in (("pretrain", pre), ("finetune", ft))},
        "n_params": n_params,
        "train_dtype": str(dtype).removeprefix("torch."),
        "rows": {"web_train": len(web_train), "chat_train": len(chat_train),
                 "web_heldout": split["heldout"][0].height, "chat_heldout": split["heldout"][1].height},
        "time_s": timings,
    }
    publish(tmp, out, metrics)
    log.info("toy pair written to %s in %.0f s", out, timings["total"])
    return metrics
