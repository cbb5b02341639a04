"""Greedy chat responses, batched by prompt length.

Prompts are rendered in the model's chat template and sorted by token count before batching, so a batch pads to
its own longest prompt, not the longest of all: on the Gemma 3 270M behaviour table (short questions beside
summarisation passages) this halves the prefill, which was half the generation time. Answers come back in the
caller's order.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from tqdm import tqdm

_END_OF_TURN = ("<end_of_turn>", "<|eot_id|>", "<|im_end|>", "<|end|>")  # Gemma, Llama 3, ChatML, Phi


def stop_ids(tokenizer, model=None) -> list[int]:
    """Token ids that end an assistant turn: EOS (tokenizer and generation config) and the template's end-of-turn."""
    ids = {tokenizer.eos_token_id}
    gen_eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    ids |= set(gen_eos) if isinstance(gen_eos, (list, tuple)) else {gen_eos}
    vocab = tokenizer.get_vocab()
    ids |= {vocab[t] for t in _END_OF_TURN if t in vocab}
    return sorted(i for i in ids if i is not None)


@torch.inference_mode()
def greedy_responses(model, tokenizer, prompts: Sequence[Sequence[Mapping[str, str]]], max_new_tokens: int,
                     stops: Sequence[int], batch_size: int = 64, desc: str = "generate") -> list[str]:
    """Greedy responses to chat prompts (message lists ending in a user turn), left-padded, each stopped at its
    first `stops` token; special tokens are dropped from the text."""
    model.eval()
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else stops[0]
    device = next(model.parameters()).device
    ids = [tokenizer.apply_chat_template([dict(m) for m in p], add_generation_prompt=True, return_dict=True)["input_ids"]
           for p in prompts]
    order = sorted(range(len(ids)), key=lambda i: len(ids[i]))
    out: list[str] = [""] * len(ids)
    for start in tqdm(range(0, len(order), batch_size), desc=desc, unit="batch", leave=False):
        batch = order[start: start + batch_size]
        width = len(ids[batch[-1]])
        input_ids = torch.tensor([[pad] * (width - len(ids[i])) + list(ids[i]) for i in batch], device=device)
        mask = torch.tensor([[0] * (width - len(ids[i])) + [1] * len(ids[i]) for i in batch], device=device)
        gen = model.generate(input_ids=input_ids, attention_mask=mask, max_new_tokens=max_new_tokens, do_sample=False,
                             eos_token_id=list(stops), pad_token_id=pad)
        for i, text in zip(batch, tokenizer.batch_decode(gen[:, width:], skip_special_tokens=True)):
            out[i] = text
    return out
