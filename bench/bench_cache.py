"""Activation caching: tokens/s of write_cache vs the bare forward passes of both models to layer L on the
same batches in the same run (goal: overhead <= 30%), and peak RSS when the token count doubles (goal: flat).

The pair is a random Gemma 2 (sliding/global layers, soft-caps) built on the fly; the corpus is random token
sequences of mixed lengths, so no downloads. Peak RSS is measured in fresh subprocesses (ru_maxrss).
"""

from __future__ import annotations

import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import polars as pl
import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import parser, write_result  # noqa: E402  (after the sys.path insert that finds bench/common.py)

from crossdiff import io, testing  # noqa: E402  (after the sys.path insert that finds bench/common.py)
from crossdiff.cache import _corpus_stats, plan, write_cache  # noqa: E402  (after the sys.path insert that finds bench/common.py)
from crossdiff.data import SCHEMA  # noqa: E402  (after the sys.path insert that finds bench/common.py)
from crossdiff.models import hidden_at_layer, load_pair  # noqa: E402  (after the sys.path insert that finds bench/common.py)

LAYER = 3


def make_corpus(path: Path, tokens: int, max_len: int, vocab: int, bos: int, seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    rows, have = [], 0
    while have < tokens:
        n = int(rng.integers(max_len // 4, max_len + 1))
        rows.append(dict(input_ids=[bos] + rng.integers(5, vocab, n - 1).tolist(), template=[True] + [False] * (n - 1),
                         assistant=[False] * n, source=int(rng.integers(0, 2)), behaviour=None, text=""))
        have += n - 1
    df = pl.DataFrame(rows, schema={k: v for k, v in SCHEMA.items() if k != "seq"})
    io.write_parquet(path, df.with_columns(pl.int_range(pl.len(), dtype=pl.Int64).alias("seq")).select(list(SCHEMA)))
    return path


@torch.inference_mode()
def bare_forward(pair, corpus: Path, batch_tokens: int, device: str = "cpu") -> float:
    """Seconds for just the two forward passes to layer L over the same batches write_cache runs."""
    lengths, keep = _corpus_stats(corpus, pair.tokenizer.bos_token_id)
    p = plan(lengths, keep, batch_tokens)
    df = pl.read_parquet(corpus)
    batches = []
    for idx in p.batches:  # tensors built outside the timed region: only the model compute is timed
        seqs = df[idx]["input_ids"].to_list()
        w = max(map(len, seqs))
        ids, mask = torch.zeros(len(seqs), w, dtype=torch.long), torch.zeros(len(seqs), w, dtype=torch.long)
        for i, s in enumerate(seqs):
            ids[i, : len(s)], mask[i, : len(s)] = torch.tensor(s), 1
        batches.append((ids.to(device), mask.to(device)))
    sync(device)
    t0 = time.perf_counter()
    for ids, mask in batches:
        hidden_at_layer(pair.base, ids, mask, LAYER)
        hidden_at_layer(pair.chat, ids, mask, LAYER)
    sync(device)
    return time.perf_counter() - t0


def sync(device: str) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def peak_rss_child(base: str, chat: str, corpus: str, out: str, batch_tokens: int, device: str, dtype: str) -> None:
    pair = load_pair(base, chat, layer=LAYER, dtype=dtype, device=device)
    write_cache(pair, LAYER, corpus, out, batch_tokens=batch_tokens, chunk_rows=4096, device=device)
    print(json.dumps({"max_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))


def main() -> None:
    p = parser(__doc__)
    p.add_argument("--child", nargs=5, help="internal: run one caching job in this process and print its peak RSS")
    p.add_argument("--device", default="cpu", help="cpu or cuda: where both models run")
    p.add_argument("--model-dtype", default="float32", help="the models' weights (bfloat16 on a GPU)")
    p.add_argument("--tokens", type=int, help="corpus size (default 20k with --quick, else 100k)")
    args = p.parse_args()
    if args.child:
        return peak_rss_child(*args.child[:4], int(args.child[4]), args.device, args.model_dtype)
    tokens = args.tokens or (20_000 if args.quick else 100_000)
    hidden, layers, max_len, batch_tokens = (128, 6, 128, 4096) if args.quick else (256, 8, 256, 8192)
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        tok = testing.tiny_tokenizer()
        base, chat = testing.build_tiny_pair(tmp / "pair", "gemma2", tokenizer=tok, hidden_size=hidden, num_layers=layers)
        pair = load_pair(str(base), str(chat), layer=LAYER, dtype=args.model_dtype, device=args.device)
        corpus = make_corpus(tmp / "corpus.parquet", tokens, max_len, len(tok), tok.bos_token_id)
        rows = sum(_corpus_stats(corpus, tok.bos_token_id)[1])
        bare_forward(pair, corpus, batch_tokens, args.device)  # warm-up
        bare, ours = [], []
        for r in range(2):  # interleaved, best of 2 each: the machine is shared and noisy
            bare.append(bare_forward(pair, corpus, batch_tokens, args.device))
            t0 = time.perf_counter()
            write_cache(pair, LAYER, corpus, tmp / f"acts{r}.h5", batch_tokens=batch_tokens, chunk_rows=4096,
                        device=args.device)
            ours.append(time.perf_counter() - t0)
        bare_s, ours_s = min(bare), min(ours)
        rss = {}
        for n in (tokens, 2 * tokens):
            c = make_corpus(tmp / f"rss-{n}.parquet", n, max_len, len(tok), tok.bos_token_id, seed=1)
            out = subprocess.run([sys.executable, __file__, "--out", args.out, "--device", args.device,
                                  "--model-dtype", args.model_dtype, "--child", str(base), str(chat), str(c),
                                  str(tmp / f"rss-{n}.h5"), str(batch_tokens)], capture_output=True, text=True, check=True)
            rss[n] = json.loads(out.stdout.strip().splitlines()[-1])["max_rss_mb"]
    write_result(
        args.out, "cache",
        ours={"seconds": ours_s, "tokens_per_s": rows / ours_s},
        baseline={"seconds": bare_s, "tokens_per_s": rows / bare_s,
                  "what": "bare forward of both models to layer L, same batches"},
        ratio=bare_s / ours_s,
        goal="overhead = ours/baseline - 1 <= 0.30 (ratio >= 0.77)",
        overhead=ours_s / bare_s - 1,
        rows=rows, d_model=hidden, num_layers=layers, layer=LAYER, batch_tokens=batch_tokens, device=args.device,
        model_dtype=args.model_dtype,
        peak_rss_mb={str(k): v for k, v in rss.items()},
        rss_growth_when_tokens_double=rss[2 * tokens] / rss[tokens] - 1,
    )


if __name__ == "__main__":
    main()
