"""Shared fixtures: tiny random HF model pairs and raw corpora on disk, built once per session.

    tiny_tokenizer                 the toy tokenizer (Gemma special tokens + chat template), small vocab
    tiny_pair("gemma2"|"llama")    -> (base_dir, chat_dir), loadable with from_pretrained
    toy_data                       dir with web.parquet / chat.parquet in the embedded pair's format
"""

from __future__ import annotations

import pytest

from crossdiff import testing


@pytest.fixture(scope="session")
def tiny_tokenizer():
    return testing.tiny_tokenizer()


@pytest.fixture(scope="session")
def tiny_pair(tmp_path_factory, tiny_tokenizer):
    """Factory: tiny_pair(arch) -> (base_dir, chat_dir); each architecture is built once per session."""
    built: dict[str, tuple] = {}

    def get(arch: str = "gemma2"):
        if arch not in built:
            built[arch] = testing.build_tiny_pair(tmp_path_factory.mktemp(f"pair-{arch}"), arch, tokenizer=tiny_tokenizer)
        return built[arch]

    return get


@pytest.fixture(scope="session")
def toy_data(tmp_path_factory):
    return testing.write_toy_data(tmp_path_factory.mktemp("toy-data"))
