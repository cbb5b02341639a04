"""Chat fine-tune of a real base (LoRA): the target loss equals HF's loss, adapters merge exactly, and the
fine-tuned pair is written like the toy pair with its chat model changed at every layer."""

import json

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from crossdiff import lora, testing
from crossdiff.toy.evaluate import collate, target_loss
from crossdiff.toy.finetune import FinetuneConfig, finetune_pair
from crossdiff.toy.head_loss import linear_cross_entropy
from crossdiff.toy.pair_eval import evaluate_pair


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory, tiny_tokenizer):
    base, _ = testing.build_tiny_pair(tmp_path_factory.mktemp("g3"), "gemma3_text", tokenizer=tiny_tokenizer)
    return base


def _rows(tok):
    rows = []
    for msgs in testing.CHATS:
        text = tok.apply_chat_template(msgs, tokenize=False)
        ids = tok(text, add_special_tokens=False).input_ids
        rows.append((ids, [i % 3 == 0 for i in range(len(ids))]))
    return collate(rows, tok.pad_token_id)


@pytest.mark.parametrize("arch", ["gemma2", "gemma3_text", "qwen2"])
def test_target_loss_equals_hf_loss(arch, tiny_tokenizer):
    """The head only at target positions (and Gemma 2's soft-cap) gives exactly the model's own loss, and on
    a frozen base with adapters (the chunked head) the adapters' gradients equal those of the model's loss."""
    model = testing.tiny_model(arch, tiny_tokenizer)
    ids, att, labels = _rows(tiny_tokenizer)
    ref = model(input_ids=ids, attention_mask=att, labels=labels).loss
    torch.testing.assert_close(target_loss(model, ids, att, labels), ref, rtol=1e-5, atol=1e-6)

    params = lora.add_adapters(model, rank=4, alpha=8)           # freezes the base, head included
    with torch.no_grad():
        for p in params:
            p.normal_(0, 0.1)
    ref = model(input_ids=ids, attention_mask=att, labels=labels).loss
    want = torch.autograd.grad(ref, params)
    got_loss = target_loss(model, ids, att, labels)
    got = torch.autograd.grad(got_loss, params)
    torch.testing.assert_close(got_loss, ref, rtol=1e-5, atol=1e-6)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("cap", [None, 3.0])
def test_chunked_head_loss_equals_dense(dtype, cap):
    """linear_cross_entropy over chunks (recomputed in backward, buffers reused) = the dense weighted CE of
    cap(h Wᵀ) in value and in its gradient w.r.t. h, chunks of 64 over 300 positions (a ragged last chunk)."""
    g = torch.Generator().manual_seed(0)
    h = torch.randn(300, 16, generator=g).to(dtype).requires_grad_(True)
    W = torch.randn(1000, 16, generator=g).to(dtype)
    t = torch.randint(0, 1000, (300,), generator=g)
    coef = torch.rand(300, generator=g)
    coef /= coef.sum()
    z = (h @ W.t()).float()
    if cap:
        z = cap * torch.tanh(z / cap)
    want = (torch.nn.functional.cross_entropy(z, t, reduction="none") * coef).sum()
    (gw,) = torch.autograd.grad(want, h)
    got = linear_cross_entropy(h, W, t, coef, cap, chunk=64)
    (gg,) = torch.autograd.grad(got, h)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    tol = dict(rtol=1e-5, atol=1e-7) if dtype == torch.float32 else dict(rtol=2e-2, atol=1e-4)
    torch.testing.assert_close(gg, gw, **tol)
    with pytest.raises(ValueError, match="freeze"):
        linear_cross_entropy(h, W.clone().requires_grad_(True), t)


def test_adapters_start_at_the_base_and_merge_exactly(tiny_tokenizer):
    model = testing.tiny_model("gemma3_text", tiny_tokenizer)
    ids, att, _ = _rows(tiny_tokenizer)
    ref = model(input_ids=ids, attention_mask=att).logits
    params = lora.add_adapters(model, rank=4, alpha=8)
    assert all(p.requires_grad for p in params)
    assert not any(p.requires_grad for n, p in model.named_parameters() if not n.endswith((".A", ".B")))
    torch.testing.assert_close(model(input_ids=ids, attention_mask=att).logits, ref)  # B = 0 at the start
    with torch.no_grad():
        for p in params:
            p.normal_(0, 0.1)
    adapted = model(input_ids=ids, attention_mask=att).logits
    assert not torch.allclose(adapted, ref)
    lora.merge(model)
    assert not any(isinstance(m, lora.LoRALinear) for m in model.modules())
    torch.testing.assert_close(model(input_ids=ids, attention_mask=att).logits, adapted, rtol=1e-4, atol=1e-5)


def test_finetune_pair_writes_a_changed_chat_model(base_dir, tmp_path):
    cfg = FinetuneConfig(web_docs=40, chat_convs=120, steps=4, batch_size=4, threads=1)
    out = tmp_path / "pair"
    metrics = finetune_pair(base_dir, out, cfg)
    assert {p.name for p in out.iterdir()} == {"base", "chat", "data", "metrics.json"}
    assert json.loads((out / "metrics.json").read_text()) == metrics
    assert metrics["train"]["finetune"]["tokens"] > 0 and metrics["adapter_params"] > 0
    base, chat = load_file(out / "base" / "model.safetensors"), load_file(out / "chat" / "model.safetensors")
    assert base.keys() == chat.keys()  # merged: the chat model is a plain model of the base's architecture
    changed = {k for k in base if not torch.equal(base[k], chat[k])}
    for layer in range(4):  # every layer changed, so the residual at any L differs
        assert any(f"layers.{layer}." in k for k in changed), layer
    assert not any("embed" in k or "norm" in k for k in changed)  # only the adapted projections
    AutoModelForCausalLM.from_pretrained(out / "chat")
    # the evaluate_pair stage reads the fine-tuned pair like the toy pair
    ev = evaluate_pair(out, out, {"pair_eval": {"eval_prompts": 2, "max_new_tokens": 4, "loss_rows": 8, "threads": 1},
                                  "models": {"dtype": "float32"}, "device": "cpu"})
    assert set(ev["behaviours"]) >= {"refusal", "joke", "helpful"}
    assert all(set(v) == {"base", "chat"} for v in ev["loss"].values())


def test_decision_weight_weighs_each_turns_first_target(tiny_tokenizer):
    """Weighted target loss = a brute-force per-token weighted mean, with the first target of every run
    of targets (each assistant turn's first token) weighing `decision_weight`; weight 1 is the plain mean."""
    model = testing.tiny_model("gemma3_text", tiny_tokenizer)
    ids, att, labels = _rows(tiny_tokenizer)
    labels[:, 5:9] = ids[:, 5:9]  # a run of four targets in every row, next to the i % 3 singletons
    logits = model(input_ids=ids, attention_mask=att).logits[:, :-1].float()
    target = labels[:, 1:]
    num = den = 0.0
    for b in range(target.shape[0]):
        for t in range(target.shape[1]):
            if target[b, t] == -100:
                continue
            w = 3.0 if t == 0 or target[b, t - 1] == -100 else 1.0
            num += w * torch.nn.functional.cross_entropy(logits[b, t], target[b, t])
            den += w
    torch.testing.assert_close(target_loss(model, ids, att, labels, decision_weight=3.0), num / den,
                               rtol=1e-5, atol=1e-6)
    assert not torch.allclose(target_loss(model, ids, att, labels, decision_weight=3.0),
                              target_loss(model, ids, att, labels))


def test_adapters_trained_on_bfloat16_merge_into_float32_weights(tiny_tokenizer):
    """Adapters stay float32 on a bfloat16 base, and merge_into folds them into a float32 copy exactly as
    merging them into that copy's own adapters would."""
    fp32 = testing.tiny_model("gemma3_text", tiny_tokenizer)
    bf16 = testing.tiny_model("gemma3_text", tiny_tokenizer).to(torch.bfloat16)
    bf16.load_state_dict({k: v.to(torch.bfloat16) for k, v in fp32.state_dict().items()})
    params = lora.add_adapters(bf16, rank=4, alpha=8)
    assert all(p.dtype == torch.float32 for p in params)
    with torch.no_grad():
        for p in params:
            p.normal_(0, 0.1)
    ids, att, labels = _rows(tiny_tokenizer)
    target_loss(bf16, ids, att, labels).backward()  # gradients reach the float32 adapters through bf16
    assert all(p.grad is not None and p.grad.dtype == torch.float32 for p in params)

    reference = testing.tiny_model("gemma3_text", tiny_tokenizer)
    reference.load_state_dict(fp32.state_dict())
    lora.add_adapters(reference, rank=4, alpha=8)
    reference.load_state_dict({k: v.float() for k, v in bf16.state_dict().items() if k.endswith((".A", ".B"))},
                              strict=False)
    lora.merge(reference)
    merged = lora.merge_into(bf16, fp32)
    for (name, got), want in zip(merged.state_dict().items(), reference.state_dict().values()):
        torch.testing.assert_close(got, want, msg=name)
    with pytest.raises(ValueError, match="no adapters"):
        lora.merge_into(fp32, reference)


def test_train_dtype_auto_resolves_and_rejects_unknown():
    from crossdiff.toy.build import resolve_train_dtype
    assert resolve_train_dtype("auto", "finetune") in (torch.bfloat16, torch.float32)
    assert resolve_train_dtype("float32", "finetune") is torch.float32
    with pytest.raises(ValueError, match="train_dtype"):
        resolve_train_dtype("float16", "finetune")

