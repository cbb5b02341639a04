"""Embed every context window of the val cache with all-MiniLM-L6-v2, once for all variants -> .npy

collect_examples draws each latent's MiniLM-similar negatives from these (paper A.10); they depend on the
cache and `autointerp.window` only, so every crosscoder variant shares them.
"""

import numpy as np

from crossdiff import cli, io
from crossdiff.autointerp.examples import embed_windows


def main(argv=None) -> None:
    p = cli.parser(__doc__)
    p.add_argument("--val", required=True, help="validation activation cache (HDF5)")
    p.add_argument("--tokenizer", required=True, help="tokenizer dir or HF id (the chat model's)")
    p.add_argument("--out", required=True, help="window_embeddings.npy: (n_windows, 384) float32, unit rows")
    p.add_argument("--device", default=None, help="overrides params `device` (auto | cpu | cuda[:N])")
    args, params = cli.parse(p, argv)
    emb = embed_windows(args.val, args.tokenizer, params["autointerp"]["window"],
                        device=str(cli.resolve_device(cli.device_name(args, params))))
    with io.atomic_path(args.out, suffix=".npy") as tmp, open(tmp, "wb") as f:
        np.save(f, emb)


if __name__ == "__main__":
    main()
