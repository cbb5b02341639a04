"""Explainer and detection-scorer prompts (Paulo et al. 2024, as used in paper A.10), and their parsing.

Prompts are single user turns (no system role): Gemma's chat template, and so the embedded toy
chat model's, rejects system messages, and every OpenAI-compatible endpoint accepts a user turn.
Parsing is forgiving about everything around the answer (reasoning, `<think>` blocks, prose) and
strict about the answer itself: a label list of the wrong length is no answer.
"""

from __future__ import annotations

import hashlib
import json
import re
from typing import Sequence

OPEN, CLOSE = "<<", ">>"
EXPLANATION_TAG = "[EXPLANATION]:"

EXPLAINER = """We are studying one latent feature of a language model's internal activations. Below are \
text excerpts where the feature is active. In each excerpt the tokens on which it is active are marked \
{open}like this{close}. The excerpts come from web text and from chat conversations; chat turns are \
delimited by template tokens such as <start_of_turn> and <end_of_turn>, which can be marked too.

Find what the marked tokens have in common: a word or token, a concept, a topic, a grammatical role, a \
position in the conversation, or a behaviour of the assistant. Consider the context around the marked \
tokens, not only the tokens themselves. The excerpts span the whole range of activation strengths, from \
strong to weak.

You may reason briefly first. End your reply with one line of the form
{tag} <a concise description of what the feature detects, at most one sentence>

{examples}"""

SCORER = """We are studying one latent feature of a language model's internal activations. It has been \
described as:

{explanation}

Below are {n} text excerpts. Some of them contain tokens on which the feature is active; others do not. \
For each excerpt, decide from the description whether the feature is active anywhere in it: 1 if it is, \
0 if it is not.

{examples}

Reply with a list of exactly {n} numbers, one per excerpt in order, each 0 or 1, for example \
[{example_answer}], and nothing else."""


def format_tokens(tokens: Sequence[str], acts: Sequence[float] | None = None) -> str:
    """Join token strings into one line; with `acts`, wrap each run of active (> 0) tokens in << >>."""
    parts, inside = [], False
    for i, tok in enumerate(tokens):
        active = acts is not None and acts[i] > 0
        if active and not inside:
            parts.append(OPEN)
        elif not active and inside:
            parts.append(CLOSE)
        inside = active
        parts.append(tok)
    if inside:
        parts.append(CLOSE)
    return "".join(parts).replace("\r", "\\r").replace("\n", "\\n")  # one excerpt per line


def numbered(lines: Sequence[str]) -> str:
    return "\n".join(f"Example {i + 1}: {line}" for i, line in enumerate(lines))


def explainer_messages(examples: Sequence[tuple[Sequence[str], Sequence[float]]]) -> list[dict[str, str]]:
    """The explainer's request: activating examples (token strings, per-token activations), highlighted."""
    if not examples:
        raise ValueError("the explainer needs at least one activating example")
    body = numbered([format_tokens(tokens, acts) for tokens, acts in examples])
    content = EXPLAINER.format(open=OPEN, close=CLOSE, tag=EXPLANATION_TAG, examples=body)
    return [{"role": "user", "content": content}]


def scorer_messages(explanation: str, texts: Sequence[Sequence[str]]) -> list[dict[str, str]]:
    """The detection scorer's request: the explanation and plain (unhighlighted) examples to label."""
    if not texts:
        raise ValueError("the scorer needs at least one example")
    n = len(texts)
    example_answer = ", ".join("10"[i % 2] for i in range(min(n, 3))) + (", ..." if n > 3 else "")
    content = SCORER.format(explanation=explanation.strip() or "(no explanation)", n=n,
                            examples=numbered([format_tokens(t) for t in texts]), example_answer=example_answer)
    return [{"role": "user", "content": content}]


def prompt_hash(messages: list[dict[str, str]]) -> str:
    return hashlib.sha256(json.dumps(messages, sort_keys=True, ensure_ascii=False).encode()).hexdigest()[:16]


_THINK = re.compile(r"<think>.*?(</think>|$)", re.S | re.I)
_TAGGED = re.compile(r"\[\s*explanation\s*\]\s*:?[ \t]*(.*)", re.I)
_LABELLED = re.compile(r"^\W*explanation\W*:[ \t]*(.*)$", re.I | re.M)


def _clean(text: str) -> str:
    """Drop highlight markers, markdown emphasis, and one pair of enclosing quotes."""
    text = text.replace(OPEN, "").replace(CLOSE, "").strip().strip("*_` \t")
    if len(text) >= 2 and text[0] == text[-1] and text[0] in "\"'":
        text = text[1:-1].strip()
    return text


def parse_explanation(response: str, max_chars: int = 300) -> str | None:
    """The explanation in an explainer reply: the text after the last `[EXPLANATION]:` tag.

    Falls back to a line starting `Explanation:`. Returns None when neither is there (the reply is
    kept raw in explanations.jsonl; a latent without an explanation scores on an empty description).
    """
    text = _THINK.sub("", response or "")
    for pattern in (_TAGGED, _LABELLED):
        matches = list(pattern.finditer(text))
        if not matches:
            continue
        m = matches[-1]
        found = _clean(m.group(1))
        if not found:  # tag on its own line: the explanation is the next non-empty line
            rest = [line for line in text[m.end():].splitlines() if line.strip()]
            found = _clean(rest[0]) if rest else ""
        if found:
            return found[:max_chars]
    return None


_LIST = re.compile(r"\[([^\[\]]*)\]")
_LABEL = {"1": 1, "0": 0, "true": 1, "false": 0, "yes": 1, "no": 0}


def parse_labels(response: str, n: int) -> list[int] | None:
    """The scorer's 0/1 labels: the last bracketed list in the reply with exactly `n` valid items, else None."""
    text = _THINK.sub("", response or "")
    for m in reversed(list(_LIST.finditer(text))):
        items = [item.strip().strip("'\"").lower() for item in m.group(1).split(",")]
        if len(items) == n and all(item in _LABEL for item in items):
            return [_LABEL[item] for item in items]
    return None
