"""Constrained outputs: have the server, not the parser, guarantee the shape of the LLM's answers.

Three modes, chosen by `autointerp.constrain`:

- `json_schema`: OpenAI `response_format` with a JSON schema for each answer (the explainer's
  `{"reasoning", "explanation"}`, the scorer's `{"labels": [n x 0/1]}`). vLLM, llama.cpp's server
  and hosted APIs enforce it; a server that ignores it (transformers serve 5.x logs "Ignoring
  unsupported fields: response_format") still gets a prompt asking for the same JSON, parsed below.
- `logit_bias`: what transformers serve does honour. The scorer may only emit the tokens "0" and
  "1" (`logit_bias` +100 on them, so no other token, end-of-sequence included, can win) for exactly
  `max_tokens = n` tokens: n labels, always parseable. The explainer's answer is one line (`stop` at
  the first newline, at most 64 tokens). Needs the served model's tokenizer, so only for a server we
  start ourselves.
- `none`: prompts and robust parsing only (any endpoint).

`auto` is `logit_bias` on the local server and `json_schema` on a configured endpoint.
"""

from __future__ import annotations

from dataclasses import dataclass, field

MODES = ("auto", "json_schema", "logit_bias", "none")
LABELS = ("0", "1")
BIAS = 100.0  # the OpenAI API's maximum; a float, since transformers serve rejects integer biases
# The one-line explanation needs no more: the parser keeps 300 characters (~70 tokens). A small model
# that loops on one line would otherwise decode all of `autointerp.max_tokens` (~40 ms a token on 2 cores).
ONE_LINE_MAX_TOKENS = 64


def resolve(mode: str, local_server: bool) -> str:
    """The mode to use: `auto` -> `logit_bias` for our own local server, else `json_schema`."""
    if mode not in MODES:
        raise ValueError(f"autointerp.constrain must be one of {MODES}, got {mode!r}")
    if mode == "auto":
        return "logit_bias" if local_server else "json_schema"
    if mode == "logit_bias" and not local_server:
        raise ValueError("autointerp.constrain: logit_bias needs the served model's tokenizer, so it only works "
                         "with the local server (endpoint.base_url empty); use json_schema or none")
    return mode


def label_token_ids(tokenizer) -> dict[str, list[int]]:
    """Ids of the vocabulary entries that decode to exactly "0" and to exactly "1"."""
    out: dict[str, list[int]] = {label: [] for label in LABELS}
    for i in range(len(tokenizer)):
        text = tokenizer.decode([i])
        if text in out:
            out[text].append(i)
    empty = [label for label, ids in out.items() if not ids]
    if empty:
        raise ValueError(f"the tokenizer has no single token for {empty}: use autointerp.constrain json_schema or none")
    return out


def explanation_schema() -> dict:
    """The explainer's answer: brief reasoning first (so the model can think), then the explanation."""
    return {"type": "object", "additionalProperties": False, "required": ["reasoning", "explanation"],
            "properties": {"reasoning": {"type": "string", "maxLength": 300},
                           "explanation": {"type": "string", "minLength": 1, "maxLength": 300}}}


def labels_schema(n: int) -> dict:
    """The scorer's answer: exactly `n` labels, each 0 or 1."""
    return {"type": "object", "additionalProperties": False, "required": ["labels"],
            "properties": {"labels": {"type": "array", "items": {"type": "integer", "enum": [0, 1]},
                                      "minItems": n, "maxItems": n}}}


def _response_format(name: str, schema: dict) -> dict:
    return {"type": "json_schema", "json_schema": {"name": name, "strict": True, "schema": schema}}


@dataclass
class Constraint:
    """Per-request extras for one mode, and the answer style the prompts ask for (`prompts.STYLES`)."""

    mode: str
    label_ids: dict[str, list[int]] = field(default_factory=dict)  # logit_bias only

    @classmethod
    def build(cls, mode: str, local_server: bool, tokenizer_path: str | None = None) -> Constraint:
        mode = resolve(mode, local_server)
        if mode != "logit_bias":
            return cls(mode)
        from transformers import AutoTokenizer

        return cls(mode, label_token_ids(AutoTokenizer.from_pretrained(tokenizer_path)))

    @property
    def style(self) -> str:
        """How the prompts ask for the answer: `json`, `line`/`digits` (logit_bias) or `tag`/`list`."""
        return {"json_schema": "json", "logit_bias": "constrained", "none": "free"}[self.mode]

    def explain_extras(self, max_tokens: int | None = None) -> dict:
        if self.mode == "json_schema":
            return {"response_format": _response_format("explanation", explanation_schema())}
        if self.mode == "logit_bias":  # the answer is the one line the prompt asks for
            cap = {"max_tokens": min(max_tokens, ONE_LINE_MAX_TOKENS)} if max_tokens else {}
            return {"stop": ["\n"], **cap}
        return {}

    def score_extras(self, n: int) -> dict:
        if self.mode == "json_schema":
            return {"response_format": _response_format("labels", labels_schema(n))}
        if self.mode == "logit_bias":
            bias = {str(i): BIAS for ids in self.label_ids.values() for i in ids}
            return {"logit_bias": bias, "max_tokens": n}  # n tokens, each "0" or "1"
        return {}

    def describe(self) -> dict:
        """What metrics.json records about the constraint of each stage."""
        return {"mode": self.mode,
                "explain": {"json_schema": "response_format json_schema {reasoning, explanation}",
                            "logit_bias": f"one line: stop at the first newline, at most {ONE_LINE_MAX_TOKENS} tokens",
                            "none": "prompt only ([EXPLANATION]: tag)"}[self.mode],
                "score": {"json_schema": "response_format json_schema {labels: n x 0/1}",
                          "logit_bias": "logit_bias: only the tokens 0/1, max_tokens = n",
                          "none": "prompt only (a list of n numbers)"}[self.mode]}
