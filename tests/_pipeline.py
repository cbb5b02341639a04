"""Helpers for tests that run the real pipeline on the tiny preset in a throw-away git repo."""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
from pathlib import Path

import yaml

from crossdiff import config as cfg
from crossdiff.dvcsync import sync

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def env() -> dict:
    e = dict(os.environ)
    e["PATH"] = f"{BIN}{os.pathsep}{e.get('PATH', '')}"
    e.pop("CROSSDIFF_UNDER_DVC", None)
    return e


def run(*cmd, cwd, check=True, timeout=1800) -> subprocess.CompletedProcess:
    r = subprocess.run(list(cmd), cwd=cwd, env=env(), capture_output=True, text=True, timeout=timeout)
    if check and r.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed ({r.returncode}):\n{r.stdout[-4000:]}\n{r.stderr[-6000:]}")
    return r


def tiny_repo(dest: Path, **overrides) -> Path:
    """A git repo with this project's tracked files, params.yaml = defaults + tiny preset + overrides."""
    files = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, text=True, check=True)
    for rel in filter(None, files.stdout.split("\0")):
        src = ROOT / rel
        if src.is_file():
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / rel)
    params = cfg.merge(yaml.safe_load((ROOT / "params.yaml").read_text()),
                       yaml.safe_load((ROOT / "presets" / "tiny.yaml").read_text()))
    params = cfg.merge(params, overrides)
    (dest / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    sync(dest)
    run("git", "init", "-q", cwd=dest)
    run("git", "-c", "user.name=t", "-c", "user.email=t@t", "add", "-A", cwd=dest)
    run("git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "tiny", cwd=dest)
    return dest


def digest(path: Path) -> str:
    """Content hash of a file or directory tree."""
    h = hashlib.sha256()
    paths = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    for p in paths:
        h.update(str(p.relative_to(path) if path.is_dir() else p.name).encode())
        h.update(p.read_bytes())
    return h.hexdigest()


def digests(root: Path, rels) -> dict:
    return {rel: digest(root / rel) for rel in rels}
