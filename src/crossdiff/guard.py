"""Refuse to run Snakemake while DVC is running in the same repository.

DVC runs each stage by calling Snakemake (with CROSSDIFF_UNDER_DVC=1); a second, independent
`snakemake` started meanwhile would race it on the same outputs, and neither tool would notice.
The reverse (`dvc repro` during a plain `snakemake`) is caught by Snakemake's own output locks.
"""

from __future__ import annotations

import os
from pathlib import Path

import zc.lockfile


class ConcurrentRunError(RuntimeError):
    pass


def refuse_if_dvc_running(root: str | os.PathLike = ".") -> None:
    if os.environ.get("CROSSDIFF_UNDER_DVC") == "1":
        return
    lock = Path(root) / ".dvc" / "tmp" / "lock"
    if not lock.exists():
        return
    try:
        zc.lockfile.LockFile(str(lock)).close()
    except zc.lockfile.LockError:
        raise ConcurrentRunError(
            "DVC is running in this repository (it holds .dvc/tmp/lock). Wait for it to finish: "
            "never run `snakemake` and `dvc repro` at the same time."
        ) from None
