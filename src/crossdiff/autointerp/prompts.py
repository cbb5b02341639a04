"""Explainer and detection-scorer prompts (Paulo et al. 2024, as used in paper A.10), and their parsing.

Prompts are single user turns (no system role): Gemma's chat template, and so the embedded toy
chat model's, rejects system messages, and every OpenAI-compatible endpoint accepts a user turn.
Each prompt asks for its answer in one of three styles, matching the server-side constraint
(constrain.py): `json` (a JSON object), `constrained` (the explanation as one bare line; the labels as
n bare digits) and `free` (an `[EXPLANATION]:` tag; a bracketed list). Parsing accepts every style
whatever was asked, since a server may ignore the constraint; it is forgiving about everything around
the answer (reasoning, `<think>` blocks, prose, code fences) and strict about the answer itself: a
label list of the wrong length is no answer.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Sequence

OPEN, CLOSE = "<<", ">>"
EXPLANATION_TAG = "[EXPLANATION]:"

EXPLAINER = """We are studying one latent feature of a language model's internal activations. Below are \
text excerpts where the feature is active. In each excerpt the tokens on which it is active are marked \
{open}like this{close}. The excerpts come from web text and from chat conversations; chat turns are \
delimited by template tokens such as <start_of_turn> and <end_of_turn>, which can be marked too. The \
feature may respond to a word or token, a concept, a topic, a grammatical role, a position in the \
conversation, or a behaviour of the assistant; consider the context around the marked tokens, not only \
the tokens themselves. The excerpts span the whole range of activation strengths, from strong to weak.

{examples}

What do the marked tokens have in common? {answer}"""

# The one-line (`constrained`) style is for small local models (the default explainer SmolLM2-135M):
# a short prompt whose question names what to describe. The long prompt's list of kinds of feature is
# copied verbatim by such models as their "explanation" (measured), and costs prompt tokens on every call.
EXPLAINER_SHORT = """Below are excerpts of chats between a user and an assistant, and of web text. One hidden \
feature of a language model fires on the tokens marked {open}like this{close}.

{examples}

What kind of text, topic or assistant behaviour do these excerpts have in common? {answer}"""

# How the explainer is asked to answer, per answer style (see constrain.Constraint.style). The question
# comes last, after the examples, and lists no kinds of answer: small models copy such a list verbatim.
EXPLAINER_ANSWER = {
    "free": "You may reason briefly first. End your reply with one line of the form\n"
            "{tag} <a concise description of what the feature detects, at most one sentence>",
    "constrained": "Answer in one short sentence.",
    "json": 'You may reason briefly first. Reply with a JSON object {{"reasoning": "<your brief reasoning>", '
            '"explanation": "<a concise description of what the feature detects, at most one sentence>"}}.',
}

SCORER = """We are studying one latent feature of a language model's internal activations. It has been \
described as:

{explanation}

Below are {n} text excerpts. Some of them contain tokens on which the feature is active; others do not. \
For each excerpt, decide from the description whether the feature is active anywhere in it: 1 if it is, \
0 if it is not.

{examples}

{answer}"""

SCORER_ANSWER = {
    "free": "Reply with a list of exactly {n} numbers, one per excerpt in order, each 0 or 1, for example "
            "[{example}], and nothing else.",
    "constrained": "Reply with exactly {n} digits, one per excerpt in order, each 1 (active) or 0 (not active), "
                   "written together with nothing else, for example {digits}.",
    "json": 'Reply with a JSON object {{"labels": [...]}} holding exactly {n} numbers, one per excerpt in order, '
            'each 0 or 1, for example {{"labels": [{example}]}}.',
}
STYLES = tuple(SCORER_ANSWER)


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


def _style(style: str) -> str:
    if style not in STYLES:
        raise ValueError(f"answer style must be one of {STYLES}, got {style!r}")
    return style


def explainer_messages(examples: Sequence[tuple[Sequence[str], Sequence[float]]],
                       style: str = "free") -> list[dict[str, str]]:
    """The explainer's request: activating examples (token strings, per-token activations), highlighted."""
    if not examples:
        raise ValueError("the explainer needs at least one activating example")
    body = numbered([format_tokens(tokens, acts) for tokens, acts in examples])
    answer = EXPLAINER_ANSWER[_style(style)].format(tag=EXPLANATION_TAG)
    template = EXPLAINER_SHORT if style == "constrained" else EXPLAINER
    content = template.format(open=OPEN, close=CLOSE, examples=body, answer=answer)
    return [{"role": "user", "content": content}]


def scorer_messages(explanation: str, texts: Sequence[Sequence[str]], style: str = "free") -> list[dict[str, str]]:
    """The detection scorer's request: the explanation and plain (unhighlighted) examples to label."""
    if not texts:
        raise ValueError("the scorer needs at least one example")
    n = len(texts)
    digits = "".join("10"[i % 2] for i in range(min(n, 3)))
    example = ", ".join(digits) + (", ..." if n > 3 else "")
    answer = SCORER_ANSWER[_style(style)].format(n=n, example=example, digits=digits)
    content = SCORER.format(explanation=explanation.strip() or "(no explanation)", n=n,
                            examples=numbered([format_tokens(t) for t in texts]), answer=answer)
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


def _json_object(text: str) -> dict | None:
    """The JSON object in a reply (code fences and text around it allowed), or None."""
    start, end = text.find("{"), text.rfind("}")
    if start < 0 or end <= start:
        return None
    try:
        obj = json.loads(text[start:end + 1])
    except json.JSONDecodeError:
        return None
    return obj if isinstance(obj, dict) else None


def parse_explanation(response: str, max_chars: int = 300, one_line: bool = False) -> str | None:
    """The explanation in an explainer reply.

    In order: the `explanation` of a JSON answer; the text after the last `[EXPLANATION]:` tag; a line
    starting `Explanation:`; with `one_line` (the answer style that asks for nothing but the
    explanation), the reply's first non-empty line. None when none of these is there (the reply is
    kept raw in explanations.jsonl; a latent without an explanation scores on an empty description).
    """
    text = _THINK.sub("", response or "")
    obj = _json_object(text)
    if obj is not None and isinstance(obj.get("explanation"), str) and _clean(obj["explanation"]):
        return _clean(obj["explanation"])[:max_chars]
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
    if one_line:
        lines = [_clean(line) for line in text.splitlines() if _clean(line)]
        return lines[0][:max_chars] if lines else None
    return None


_LIST = re.compile(r"\[([^\[\]]*)\]")
_LABEL = {"1": 1, "0": 0, "true": 1, "false": 0, "yes": 1, "no": 0}
_DIGITS = re.compile(r"[\s,]*((?:[01][\s,]*)+)")


def parse_labels(response: str, n: int) -> list[int] | None:
    """The scorer's 0/1 labels, else None. Accepted: a JSON `{"labels": [...]}`, a reply of nothing but
    `n` digits 0/1 (the logit_bias answer), or the last bracketed list in the reply with exactly `n`
    valid items. A wrong count is no answer."""
    text = _THINK.sub("", response or "")
    obj = _json_object(text)
    if obj is not None and isinstance(obj.get("labels"), list):
        labels = obj["labels"]
        if len(labels) == n and all(str(x).lower() in _LABEL for x in labels):
            return [_LABEL[str(x).lower()] for x in labels]
    m = _DIGITS.fullmatch(text)
    if m:
        digits = [c for c in m.group(1) if c in "01"]
        return [int(c) for c in digits] if len(digits) == n else None
    for m in reversed(list(_LIST.finditer(text))):
        items = [item.strip().strip("'\"").lower() for item in m.group(1).split(",")]
        if len(items) == n and all(item in _LABEL for item in items):
            return [_LABEL[item] for item in items]
    return None
