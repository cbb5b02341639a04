"""The toy pair's tokenizer: byte-level BPE trained locally, Gemma's special tokens and chat template.

Loaded with `AutoTokenizer.from_pretrained(dir)` it behaves like Gemma 2's: `tokenizer(text)` starts
with `<bos>`, and `apply_chat_template` renders `<bos><start_of_turn>user\\n...<end_of_turn>\\n
<start_of_turn>model\\n...<end_of_turn>\\n` (the assistant role is rendered as `model`).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast

PAD, EOS, BOS, START, END = "<pad>", "<eos>", "<bos>", "<start_of_turn>", "<end_of_turn>"
SPECIAL_TOKENS = [PAD, EOS, BOS, START, END]  # ids 0..4 (Gemma's order for pad/eos/bos)

# google/gemma-2-2b-it's chat template, verbatim.
CHAT_TEMPLATE = (
    "{{ bos_token }}{% if messages[0]['role'] == 'system' %}{{ raise_exception('System role not supported') }}"
    "{% endif %}{% for message in messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if (message['role'] == 'assistant') %}{% set role = 'model' %}{% else %}{% set role = message['role'] %}"
    "{% endif %}{{ '<start_of_turn>' + role + '\n' + message['content'] | trim + '<end_of_turn>\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{'<start_of_turn>model\n'}}{% endif %}"
)


def training_texts(web: Iterable[str], chats: Iterable[Sequence[dict]]) -> Iterable[str]:
    """What the BPE sees: web documents, every message, and the role headers of the template."""
    yield from web
    for messages in chats:
        yield "user\n"
        yield "model\n"
        for m in messages:
            yield m["content"]


def train_tokenizer(texts: Iterable[str], vocab_size: int, max_len: int) -> PreTrainedTokenizerFast:
    """Byte-level BPE over `texts` (deterministic for a fixed text order), wrapped as an HF tokenizer."""
    if vocab_size < 256 + len(SPECIAL_TOKENS):
        raise ValueError(f"vocab_size must cover the 256 byte tokens and {len(SPECIAL_TOKENS)} special tokens")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    bos_id = tok.token_to_id(BOS)
    tok.post_processor = processors.TemplateProcessing(  # like Gemma: encoding a text prepends <bos>
        single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B", special_tokens=[(BOS, bos_id)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=BOS,
        eos_token=EOS,
        pad_token=PAD,
        additional_special_tokens=[START, END],
        chat_template=CHAT_TEMPLATE,
        padding_side="left",  # batched generation, as with Gemma
        model_max_length=max_len,
    )


def render(tokenizer, messages: Sequence[dict]) -> str:
    return tokenizer.apply_chat_template(list(messages), tokenize=False)


def assistant_labels(tokenizer, messages: Sequence[dict]) -> tuple[list[int], list[bool]]:
    """Token ids of a rendered conversation and which of them the fine-tuning loss is on.

    The loss covers each assistant turn's content and its closing `<end_of_turn>` (so the model
    learns to stop), not the user turns, the `<bos>` or the `<start_of_turn>model\\n` header.
    Found from character offsets, so it does not depend on how BPE splits the text.
    """
    text = render(tokenizer, messages)
    spans, cursor = [], 0
    for m in messages:
        header = f"{START}{'model' if m['role'] == 'assistant' else m['role']}\n"
        start = text.index(header, cursor) + len(header)
        end = text.index(END, start) + len(END)
        if m["role"] == "assistant":
            spans.append((start, end))
        cursor = end
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    mask = [any(a < e and b > s for s, e in spans) for a, b in enc["offset_mapping"]]
    return enc["input_ids"], mask
