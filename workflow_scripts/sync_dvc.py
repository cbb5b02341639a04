"""Write dvc.yaml from the Snakemake DAG (`--check`: fail if the committed file is stale)."""

import argparse
import sys
from pathlib import Path

from crossdiff.dvcsync import sync


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--check", action="store_true", help="exit 1 if dvc.yaml is out of date")
    p.add_argument("--root", default=str(Path(__file__).resolve().parents[1]))
    args = p.parse_args()
    current = sync(args.root, check=args.check)
    if args.check and not current:
        print("dvc.yaml is stale: run `make sync-dvc` (workflow_scripts/sync_dvc.py) and commit it.", file=sys.stderr)
        return 1
    print("dvc.yaml is up to date." if current else "dvc.yaml written.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
