"""Small test utilities shared across test files (fixtures live in conftest.py)."""

import importlib.util
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def script(name: str):
    """Import workflow_scripts/{name}.py as a module, to call its main(argv) in-process (no interpreter start-up)."""
    spec = importlib.util.spec_from_file_location(f"workflow_scripts.{name}", ROOT / "workflow_scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
