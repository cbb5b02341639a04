"""A (base, chat) model pair and a forward pass split at the output of decoder layer L.

"Layer L" is the residual stream after decoder layer L (0-based) = HF's `output_hidden_states[L + 1]`
(for the last layer HF reports the residual after the final norm; we return the residual itself).
`hidden_at_layer` runs embeddings + layers[:L+1] and stops (no compute on later layers, DESIGN §7);
`logits_from_layer` runs layers[L+1:] + final norm + LM head (+ Gemma 2's final soft-cap) from a given
residual, so the causal stage can patch h at layer L and read the model's predictions (paper A.8).
Both build position ids, attention masks (per layer type: Gemma 2 alternates sliding-window and global
layers) and rotary embeddings the way the HF forward does without a KV cache; `check_split` verifies
that on a padded batch, and `load_pair` runs it, so an architecture whose forward differs fails loudly.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase
from transformers.masking_utils import create_causal_mask, create_sliding_window_causal_mask

log = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
_MASKS = {"full_attention": create_causal_mask, "sliding_attention": create_sliding_window_causal_mask}


class PairMismatchError(ValueError):
    """The two models cannot be compared token by token at one layer."""


@dataclass
class Pair:
    base: PreTrainedModel
    chat: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase  # the chat model's (it carries the chat template); same ids as the base's
    base_name: str = ""
    chat_name: str = ""


def _text_config(config):
    """Multimodal configs nest the language model's; plain causal LMs return themselves."""
    return config.get_text_config() if hasattr(config, "get_text_config") else config


def check_tokenizers(base_tok, chat_tok) -> None:
    """Both models must see identical token ids for identical text: same vocabulary (incl. added tokens),
    same special tokens, same BOS (it is prepended to every sequence)."""
    problems = []
    vb, vc = base_tok.get_vocab(), chat_tok.get_vocab()
    if vb != vc:
        only_b, only_c = sorted(set(vb) - set(vc)), sorted(set(vc) - set(vb))
        moved = sorted(t for t in set(vb) & set(vc) if vb[t] != vc[t])
        problems.append(f"vocabularies differ ({len(vb)} vs {len(vc)} tokens; only in base: {only_b[:5]}, "
                        f"only in chat: {only_c[:5]}, different ids: {moved[:5]})")
    sb, sc = set(base_tok.all_special_tokens), set(chat_tok.all_special_tokens)
    if sb != sc:
        problems.append(f"special tokens differ (only in base: {sorted(sb - sc)}, only in chat: {sorted(sc - sb)})")
    if base_tok.bos_token != chat_tok.bos_token:
        problems.append(f"BOS differs ({base_tok.bos_token!r} vs {chat_tok.bos_token!r})")
    if problems:
        raise PairMismatchError("base and chat tokenizers are not interchangeable: " + "; ".join(problems))


def check_configs(base_cfg, chat_cfg, layer: int | None) -> None:
    """Same residual width (the crosscoder stacks the two), same depth, and a layer both models have."""
    b, c = _text_config(base_cfg), _text_config(chat_cfg)
    problems = []
    if b.hidden_size != c.hidden_size:
        problems.append(f"hidden sizes differ (base {b.hidden_size}, chat {c.hidden_size})")
    if b.num_hidden_layers != c.num_hidden_layers:
        problems.append(f"layer counts differ (base {b.num_hidden_layers}, chat {c.num_hidden_layers})")
    n = min(b.num_hidden_layers, c.num_hidden_layers)
    if layer is not None and not 0 <= layer < n:
        problems.append(f"layer {layer} is out of range (the models have decoder layers 0..{n - 1})")
    if problems:
        raise PairMismatchError("base and chat models cannot be paired: " + "; ".join(problems))


def load_pair(base: str, chat: str, layer: int | None = None, dtype: str = "float32", device="cpu") -> Pair:
    """Load both models from HF ids or local dirs; every pair check runs on configs and tokenizers
    before any weights are loaded. With `layer`, the split forward is verified on both models."""
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
    base_tok, chat_tok = AutoTokenizer.from_pretrained(base), AutoTokenizer.from_pretrained(chat)
    check_tokenizers(base_tok, chat_tok)
    check_configs(AutoConfig.from_pretrained(base), AutoConfig.from_pretrained(chat), layer)
    models = []
    for name in (base, chat):
        m = AutoModelForCausalLM.from_pretrained(name, dtype=DTYPES[dtype]).to(device).eval()
        m.requires_grad_(False)
        models.append(m)
    pair = Pair(models[0], models[1], chat_tok, base_name=str(base), chat_name=str(chat))
    if layer is not None:
        for m in models:
            check_split(m, layer, pad_id=chat_tok.pad_token_id or 0)
    log.info("loaded pair base=%s chat=%s (%s, d=%d, %d layers)", base, chat, dtype,
             d_model(pair.base), len(decoder_layers(pair.base)))
    return pair


def _inner(model: PreTrainedModel) -> nn.Module:
    """The decoder stack (`model.model` for *ForCausalLM): embed_tokens, rotary_emb, layers, norm."""
    inner = model.base_model
    missing = [a for a in ("embed_tokens", "layers", "norm") if not hasattr(inner, a)]
    if missing:
        raise TypeError(f"{type(model).__name__}: unsupported architecture for the split forward (no {missing})")
    return inner


def decoder_layers(model: PreTrainedModel) -> nn.ModuleList:
    return _inner(model).layers


def d_model(model: PreTrainedModel) -> int:
    return _text_config(model.config).hidden_size


def _context(model: PreTrainedModel, hidden: Tensor, attention_mask: Tensor | None):
    """Per-layer attention masks, position ids and rotary embeddings, as the HF forward builds them for a
    fresh sequence (positions 0..T-1 whatever the padding; padding enters through the mask)."""
    inner = _inner(model)
    config = inner.config
    position_ids = torch.arange(hidden.shape[1], device=hidden.device).unsqueeze(0)
    kw = dict(config=config, inputs_embeds=hidden, attention_mask=attention_mask, cache=None, position_ids=position_ids)
    types = getattr(config, "layer_types", None) or ["full_attention"] * config.num_hidden_layers
    unknown = set(types) - set(_MASKS)
    if unknown:
        raise TypeError(f"{type(model).__name__}: unsupported attention layer types {sorted(unknown)}")
    built = {t: _MASKS[t](**kw) for t in set(types)}
    rotary = getattr(inner, "rotary_emb", None)
    position_embeddings = rotary(hidden, position_ids) if rotary is not None else None
    return [built[t] for t in types], position_ids, position_embeddings


def _run_layers(model, hidden: Tensor, attention_mask: Tensor | None, start: int, stop: int) -> Tensor:
    masks, position_ids, position_embeddings = _context(model, hidden, attention_mask)
    for i in range(start, stop):
        out = decoder_layers(model)[i](hidden, attention_mask=masks[i], position_ids=position_ids,
                                       position_embeddings=position_embeddings)
        hidden = out[0] if isinstance(out, tuple) else out
    return hidden


def hidden_at_layer(model: PreTrainedModel, input_ids: Tensor, attention_mask: Tensor | None, layer: int) -> Tensor:
    """(B, T, d) residual stream at the output of decoder layer `layer`; later layers are never run."""
    n = len(decoder_layers(model))
    if not 0 <= layer < n:
        raise IndexError(f"layer {layer} out of range 0..{n - 1}")
    hidden = _inner(model).embed_tokens(input_ids)  # Gemma 2's embedding module applies the sqrt(d) scale
    return _run_layers(model, hidden, attention_mask, 0, layer + 1)


def logits_from_layer(model: PreTrainedModel, hidden: Tensor, attention_mask: Tensor | None, layer: int) -> Tensor:
    """(B, T, V) logits of the model continued from `hidden` = the residual at the output of `layer`."""
    n = len(decoder_layers(model))
    if not 0 <= layer < n:
        raise IndexError(f"layer {layer} out of range 0..{n - 1}")
    hidden = _run_layers(model, hidden, attention_mask, layer + 1, n)
    logits = model.lm_head(_inner(model).norm(hidden))
    cap = getattr(_text_config(model.config), "final_logit_softcapping", None)
    if cap is not None:  # Gemma 2: logits = cap * tanh(logits / cap)
        logits = cap * torch.tanh(logits / cap)
    return logits


@torch.inference_mode()
def check_split(model: PreTrainedModel, layer: int, pad_id: int = 0, atol: float = 1e-4) -> None:
    """Compare the split forward with the model's own forward on a left-padded random batch; raise if
    this architecture builds its masks/positions differently from what `_context` assumes."""
    p = next(model.parameters())
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, _text_config(model.config).vocab_size, (2, 12), generator=g).to(p.device)
    mask = torch.ones_like(ids)
    mask[0, :4] = 0
    ids[0, :4] = pad_id
    full = model(input_ids=ids, attention_mask=mask, output_hidden_states=True)
    h = hidden_at_layer(model, ids, mask, layer)
    ref = full.hidden_states[layer + 1]
    if layer == len(decoder_layers(model)) - 1:  # HF's last hidden state is after the final norm
        h = _inner(model).norm(h)
    keep = mask.bool()
    tol = atol if p.dtype == torch.float32 else 5e-2
    err_h = ((h - ref)[keep].abs().max() / ref[keep].abs().max().clamp_min(1.0)).item()
    lg = logits_from_layer(model, hidden_at_layer(model, ids, mask, layer), mask, layer)
    err_l = ((lg - full.logits)[keep].abs().max() / full.logits[keep].abs().max().clamp_min(1.0)).item()
    if err_h > tol or err_l > tol:
        raise NotImplementedError(
            f"{type(model).__name__}: the split forward at layer {layer} does not reproduce the model's forward "
            f"(relative error hidden {err_h:.2e}, logits {err_l:.2e}); this architecture is not supported")
