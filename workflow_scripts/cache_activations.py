"""Cache the paired layer-L residual activations of the base and chat models on a corpus split (HDF5, resumable)."""

from crossdiff import cli
from crossdiff.cache import write_cache
from crossdiff.config import Runtime
from crossdiff.models import load_pair


def main(argv=None) -> None:
    p = cli.parser(__doc__)
    p.add_argument("--base", required=True, help="base model: HF id or local dir")
    p.add_argument("--chat", required=True, help="chat model: HF id or local dir")
    p.add_argument("--corpus", required=True, help="results/corpus/{pair}/{split}.parquet")
    p.add_argument("--out", required=True, help="results/activations/{pair}/L{layer}/{split}.h5 (or a shard file)")
    p.add_argument("--shard", type=int, default=0)
    p.add_argument("--num-shards", type=int, default=1)
    args, params = cli.parse(p, argv)
    rt = Runtime.from_params(params)
    device = cli.resolve_device(rt.device)
    pair = load_pair(args.base, args.chat, layer=params["layer"], dtype=rt.dtype, device=device)
    acts = params["activations"]
    write_cache(pair, params["layer"], args.corpus, args.out, batch_tokens=acts["batch_tokens"],
                chunk_rows=acts["chunk_rows"], shard=args.shard, num_shards=args.num_shards, device=device,
                dtype=acts.get("dtype", "float16"), outlier_factor=acts.get("outlier_factor", 10.0),
                drop_outliers=acts.get("drop_outliers", False))


if __name__ == "__main__":
    main()
