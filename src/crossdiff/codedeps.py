"""The library code a workflow script runs: the static import closure of the script within `crossdiff`.

dvc.yaml lists these files as each stage's code deps, so `dvc repro` reruns a stage when any module it
imports changes (hand-kept lists went stale). The walk reads source with `ast`, nothing is imported, so
imports inside functions count too. A package's `__init__.py` runs on import, so it is a dep as well; a data
directory next to a module (report/templates) is a dep when that module names it in a string literal.
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = "crossdiff"


def _ours(name: str) -> bool:
    return name == PACKAGE or name.startswith(PACKAGE + ".")


def _module_file(src: Path, name: str) -> Path | None:
    """The file of module `name` under `src` (the directory holding the package), or None if not a module."""
    base = src.joinpath(*name.split("."))
    for path in (base.with_suffix(".py"), base / "__init__.py"):
        if path.is_file():
            return path
    return None


def _scan(path: Path, name: str) -> tuple[set[str], set[str]]:
    """(crossdiff modules `path` may import, its string literals). `name` is its module name ("" for a script).

    For `from a import b` both `a` and `a.b` are candidates; the caller keeps those that are files."""
    tree = ast.parse(path.read_text(), filename=str(path))
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    mods: set[str] = set()
    strings: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            mods.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: `from ..x import y` inside the package
                parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(parts + ([node.module] if node.module else []))
            else:
                base = node.module or ""
            mods.add(base)
            mods.update(f"{base}.{a.name}" for a in node.names)
        elif isinstance(node, ast.Constant) and isinstance(node.value, str):
            strings.add(node.value)
    return {m for m in mods if _ours(m)}, strings


def closure(script: str | Path, src: str | Path) -> list[Path]:
    """Files of the crossdiff modules `script` imports, directly or through each other (plus named data dirs)."""
    src = Path(src)
    found: dict[str, Path] = {}
    todo = [(Path(script), "")]
    data: set[Path] = set()
    while todo:
        path, name = todo.pop()
        mods, strings = _scan(path, name)
        if name:
            data.update(d for d in path.parent.iterdir() if d.is_dir() and d.name in strings
                        and not (d / "__init__.py").exists() and d.name != "__pycache__")
        for mod in mods:
            parts = mod.split(".")
            for i in range(1, len(parts) + 1):  # importing a.b.c runs a/__init__.py and a/b/__init__.py first
                parent = ".".join(parts[:i])
                if parent in found:
                    continue
                file = _module_file(src, parent)
                if file is None:
                    break
                found[parent] = file
                todo.append((file, parent))
    return sorted(set(found.values()) | data)
