"""A (base, chat) model pair and a forward pass split at the output of decoder layer L.

"Layer L" is the residual stream after decoder layer L (0-based) = HF's `output_hidden_states[L + 1]`
(for the last layer HF reports the residual after the final norm; we return the residual itself).
Both halves of the split run the model's *own* forward with a hook on decoder layer L: `hidden_at_layer`
stops the forward there (no compute on later layers, DESIGN §7); `logits_from_layer` replaces that layer's
output with a given residual and lets the forward finish, so the causal stage can patch h at layer L and
read the model's predictions (paper A.8). Masks, positions, rotary embeddings, soft-caps are never rebuilt
here, so a new decoder architecture needs no new code. `check_split` verifies the split against the full
forward on a padded batch, and `load_pair` runs it, so anything unexpected fails loudly at load.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

log = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


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


def _decoder(model: PreTrainedModel) -> nn.Module:
    """The decoder stack holding `layers` (`model.model` for *ForCausalLM, the language model of a multimodal one)."""
    for inner in (model.get_decoder(), model.base_model, getattr(model.base_model, "language_model", None)):
        if isinstance(getattr(inner, "layers", None), nn.ModuleList):
            return inner
    raise TypeError(f"{type(model).__name__}: no decoder layer stack found (expected a `layers` ModuleList)")


def decoder_layers(model: PreTrainedModel) -> nn.ModuleList:
    return _decoder(model).layers


def d_model(model: PreTrainedModel) -> int:
    return _text_config(model.config).hidden_size


class _Stop(Exception):
    """Raised from layer L's forward hook to end the model's own forward there."""

    def __init__(self, hidden: Tensor):
        self.hidden = hidden


def _residual(output) -> Tensor:
    """A decoder layer returns its residual stream, alone or first in a tuple (older architectures)."""
    return output[0] if isinstance(output, tuple) else output


def _layer_index(model: PreTrainedModel, layer: int) -> nn.Module:
    layers = decoder_layers(model)
    if not 0 <= layer < len(layers):
        raise IndexError(f"layer {layer} out of range 0..{len(layers) - 1}")
    return layers[layer]


def hidden_at_layer(model: PreTrainedModel, input_ids: Tensor, attention_mask: Tensor | None, layer: int) -> Tensor:
    """(B, T, d) residual stream at the output of decoder layer `layer`: the model's own forward, stopped there
    by a hook, so masks, positions and rotary embeddings are whatever this architecture builds; later layers
    never run."""

    def stop(module, args, output):
        raise _Stop(_residual(output))

    handle = _layer_index(model, layer).register_forward_hook(stop)
    try:
        model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
    except _Stop as s:
        return s.hidden
    finally:
        handle.remove()
    raise RuntimeError(f"{type(model).__name__}: decoder layer {layer} never ran in the forward pass")


def hidden_and_logits(model: PreTrainedModel, input_ids: Tensor, attention_mask: Tensor | None,
                      layer: int) -> tuple[Tensor, Tensor]:
    """One full forward: the residual at the output of `layer` (captured by a hook) and the logits."""
    seen = []
    handle = _layer_index(model, layer).register_forward_hook(lambda m, a, output: seen.append(_residual(output)))
    try:
        logits = model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits
    finally:
        handle.remove()
    return seen[0], logits


def logits_from_layer(model: PreTrainedModel, hidden: Tensor, attention_mask: Tensor | None, layer: int) -> Tensor:
    """(B, T, V) logits of the model continued from `hidden` = the residual at the output of `layer`.

    The model's own forward runs with layer L's output replaced by `hidden` (a hook), so the final norm, head
    and any soft-cap are the architecture's own. Layers <= L run once on `hidden` as input embeddings and their
    result is discarded: one extra pass over them buys independence from every architecture's internals."""
    hidden = hidden.to(next(model.parameters()).dtype)

    def replace(module, args, output):
        return (hidden, *output[1:]) if isinstance(output, tuple) else hidden

    handle = _layer_index(model, layer).register_forward_hook(replace)
    try:
        return model(inputs_embeds=hidden, attention_mask=attention_mask, use_cache=False).logits
    finally:
        handle.remove()


@torch.inference_mode()
def check_split(model: PreTrainedModel, layer: int, pad_id: int = 0, atol: float = 1e-4) -> None:
    """Compare the split forward with the model's own forward on a left-padded random batch; raise if
    the hooks do not see this architecture's residual stream as its own forward does."""
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
        h = _decoder(model).norm(h)
    keep = mask.bool()
    tol = atol if p.dtype == torch.float32 else 5e-2
    err_h = ((h - ref)[keep].abs().max() / ref[keep].abs().max().clamp_min(1.0)).item()
    lg = logits_from_layer(model, hidden_at_layer(model, ids, mask, layer), mask, layer)
    err_l = ((lg - full.logits)[keep].abs().max() / full.logits[keep].abs().max().clamp_min(1.0)).item()
    if err_h > tol or err_l > tol:
        raise NotImplementedError(
            f"{type(model).__name__}: the split forward at layer {layer} does not reproduce the model's forward "
            f"(relative error hidden {err_h:.2e}, logits {err_l:.2e}); this architecture is not supported")
