"""The split forward equals HF's full forward; mismatched pairs are refused before any weights load."""

import shutil

import pytest
import torch

from crossdiff import models, testing
from crossdiff.models import PairMismatchError, decoder_layers, hidden_at_layer, load_pair, logits_from_layer

TEXTS = testing.WEB[:3] + ["Short one."]


@pytest.fixture(scope="module", params=testing.ARCHS)
def pair(request, tiny_pair):
    base, chat = tiny_pair(request.param)
    return load_pair(str(base), str(chat), layer=1)


def _batch(tok, side):
    tok.padding_side = side
    try:
        enc = tok(TEXTS, padding=True, return_tensors="pt")
    finally:
        tok.padding_side = "left"
    assert (enc.attention_mask == 0).any() and enc.input_ids.shape[1] > 6  # padded, and longer than the sliding window
    return enc.input_ids, enc.attention_mask


@pytest.mark.parametrize("side", ["left", "right"])
@torch.inference_mode()
def test_split_forward_matches_full_forward(pair, side):
    ids, mask = _batch(pair.tokenizer, side)
    keep = mask.bool()
    for model in (pair.base, pair.chat):
        full = model(input_ids=ids, attention_mask=mask, output_hidden_states=True)
        n = len(decoder_layers(model))
        for layer in range(n):
            h = hidden_at_layer(model, ids, mask, layer)
            # HF reports the last layer after the final norm; the residual itself is what we return
            ours = model.base_model.norm(h) if layer == n - 1 else h
            torch.testing.assert_close(ours[keep], full.hidden_states[layer + 1][keep], rtol=1e-5, atol=1e-5)
            logits = logits_from_layer(model, h, mask, layer)
            torch.testing.assert_close(logits[keep], full.logits[keep], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("arch", sorted(testing.ARCH_CONFIGS))
@pytest.mark.parametrize("side", ["left", "right"])
@torch.inference_mode()
def test_split_forward_every_architecture(arch, side, tiny_tokenizer):
    """Gemma 2/3, Llama, Qwen2/3, Mistral, Phi-3 on tiny random configs: the split at every layer equals the
    full forward (hidden states and logits), with no per-architecture code in the split."""
    model = testing.tiny_model(arch, tiny_tokenizer)
    ids, mask = _batch(tiny_tokenizer, side)
    keep = mask.bool()
    full = model(input_ids=ids, attention_mask=mask, output_hidden_states=True)
    n = len(decoder_layers(model))
    for layer in range(n):
        h = hidden_at_layer(model, ids, mask, layer)
        ours = models._decoder(model).norm(h) if layer == n - 1 else h
        torch.testing.assert_close(ours[keep], full.hidden_states[layer + 1][keep], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(logits_from_layer(model, h, mask, layer)[keep], full.logits[keep],
                                   rtol=1e-5, atol=1e-5)
    h, logits = models.hidden_and_logits(model, ids, mask, 2)
    torch.testing.assert_close(h[keep], full.hidden_states[3][keep], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(logits[keep], full.logits[keep], rtol=1e-5, atol=1e-5)
    # continuing from a patched residual changes the outputs (the hook replaced layer L's output)
    h = hidden_at_layer(model, ids, mask, 1)
    assert not torch.allclose(logits_from_layer(model, h + 1.0, mask, 1)[keep], full.logits[keep])
    models.check_split(model, 1)


def test_gemma2_final_softcap_is_applied(tiny_pair):
    """Without the cap the tiny Gemma's logits would exceed it: the comparison above would catch a missing cap."""
    p = load_pair(*map(str, tiny_pair("gemma2")))
    ids, mask = _batch(p.tokenizer, "left")
    with torch.inference_mode():
        h = hidden_at_layer(p.chat, ids, mask, 3)
        raw = p.chat.lm_head(p.chat.base_model.norm(h))
    cap = p.chat.config.final_logit_softcapping
    assert raw.abs().max() > cap
    torch.testing.assert_close(logits_from_layer(p.chat, h, mask, 3), cap * torch.tanh(raw / cap))


def test_hidden_at_layer_stops_after_layer(pair):
    calls = []
    layers = decoder_layers(pair.base)
    handles = [layer.register_forward_hook(lambda m, a, o, i=i: calls.append(i)) for i, layer in enumerate(layers)]
    try:
        ids, mask = _batch(pair.tokenizer, "left")
        with torch.inference_mode():
            hidden_at_layer(pair.base, ids, mask, 1)
    finally:
        for h in handles:
            h.remove()
    assert calls == [0, 1]


def test_tokenizer_mismatch_is_refused(tiny_pair, tmp_path):
    base, chat = tiny_pair("llama")
    other = tmp_path / "chat"
    shutil.copytree(chat, other)
    testing.tiny_tokenizer(vocab_size=300).save_pretrained(other)
    with pytest.raises(PairMismatchError, match="vocabularies differ"):
        load_pair(str(base), str(other))


def test_special_token_mismatch_is_refused(tiny_pair, tmp_path):
    base, chat = tiny_pair("llama")
    other = tmp_path / "chat"
    shutil.copytree(chat, other)
    tok = testing.tiny_tokenizer()
    tok.add_special_tokens({"additional_special_tokens": ["<start_of_turn>", "<end_of_turn>", "<extra>"]})
    tok.save_pretrained(other)
    with pytest.raises(PairMismatchError, match=r"special tokens differ.*<extra>"):
        load_pair(str(base), str(other))


def test_config_mismatch_is_refused_before_weights_load(tiny_pair, tiny_tokenizer, tmp_path):
    base, _ = tiny_pair("gemma2")
    wide, _ = testing.build_tiny_pair(tmp_path / "wide", "gemma2", tokenizer=tiny_tokenizer, hidden_size=48)
    (wide / "model.safetensors").unlink()  # no weights: an error about them would mean we loaded before checking
    with pytest.raises(PairMismatchError, match=r"hidden sizes differ \(base 32, chat 48\)"):
        load_pair(str(base), str(wide))
    short = tmp_path / "short"
    shutil.copytree(base, short)
    (short / "model.safetensors").unlink()
    with pytest.raises(PairMismatchError, match=r"layer 4 is out of range \(the models have decoder layers 0..3\)"):
        load_pair(str(short), str(short), layer=4)


def test_unsupported_forward_is_detected(pair, monkeypatch):
    """check_split compares against the model's own forward: a layer output the hooks misread (here: a
    residual read with the wrong scale, as a wrong tuple convention would) must be caught, not silently used."""
    monkeypatch.setattr(models, "_residual", lambda output: 2 * (output[0] if isinstance(output, tuple) else output))
    with pytest.raises(NotImplementedError, match="does not reproduce"):
        models.check_split(pair.base, 1)
