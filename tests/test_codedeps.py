"""Each DVC stage depends on every library module its workflow script imports (hand-kept lists went stale)."""

import json
import subprocess
import sys
from pathlib import Path

import yaml

from crossdiff import dvcsync
from crossdiff.codedeps import closure

ROOT = Path(__file__).resolve().parents[1]

# Imports each script (its main() does not run) with crossdiff evicted from sys.modules first, so every script
# loads its own crossdiff modules again; prints script -> the crossdiff files that import loaded.
_PROBE = """
import importlib.util, json, sys
from pathlib import Path
root, out = Path(sys.argv[1]), {}
ours = lambda name: name == "crossdiff" or name.startswith("crossdiff.")
for script in sys.argv[2:]:
    for name in [n for n in sys.modules if ours(n)]:
        del sys.modules[name]
    spec = importlib.util.spec_from_file_location("stage_script", root / script)
    spec.loader.exec_module(importlib.util.module_from_spec(spec))
    out[script] = sorted(str(Path(m.__file__).resolve().relative_to(root))
                         for n, m in list(sys.modules.items()) if ours(n) and getattr(m, "__file__", None))
print(json.dumps(out))
"""


def loaded_modules(scripts: list[str]) -> dict[str, list[str]]:
    """What importing each script really loads from crossdiff (checked at run time, independent of the ast walk)."""
    r = subprocess.run([sys.executable, "-c", _PROBE, str(ROOT), *scripts], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-3000:]
    return json.loads(r.stdout)


def covered(path: str, deps: list[str]) -> bool:
    """A dep names the file itself or a directory above it."""
    return any(path == d or path.startswith(d.rstrip("/") + "/") for d in deps)


def test_dvc_stages_depend_on_every_module_their_script_imports():
    stages = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
    script_of = {}
    for name, stage in stages.items():
        scripts = [d for d in stage["deps"] if d.startswith("workflow_scripts/") and d.endswith(".py")]
        assert len(scripts) == 1, (name, scripts)
        script_of[name] = scripts[0]
    loaded = loaded_modules(sorted(set(script_of.values())))
    assert all(loaded.values())  # every script imports crossdiff: the probe saw something
    missing = {name: [m for m in loaded[script] if not covered(m, stages[name]["deps"])] for name, script in script_of.items()}
    missing = {name: mods for name, mods in missing.items() if mods}
    assert not missing, f"dvc.yaml stages miss modules their scripts import: {missing}"


def test_closure_follows_lazy_relative_and_package_imports(tmp_path):
    pkg = tmp_path / "src" / "crossdiff"
    files = {
        "__init__.py": "",
        "a.py": "from crossdiff import b\n",
        "b.py": "def f():\n    from crossdiff.sub.c import g  # imported inside a function\n",
        "unused.py": "",
        "sub/__init__.py": "",
        "sub/c.py": "from .. import d\nfrom .e import NAME\nHERE = 'templates'\n",
        "sub/e.py": "NAME = 1\n",
        "sub/templates/page.j2": "",
        "sub/static/x.css": "",  # a data dir no module names
        "d.py": "import json\nimport crossdiff.a  # a cycle\n",
    }
    for rel, text in files.items():
        (pkg / rel).parent.mkdir(parents=True, exist_ok=True)
        (pkg / rel).write_text(text)
    script = tmp_path / "script.py"
    script.write_text("import numpy\nfrom crossdiff.a import something\n")
    got = {str(p.relative_to(pkg)) for p in closure(script, tmp_path / "src")}
    assert got == {"__init__.py", "a.py", "b.py", "d.py", "sub/__init__.py", "sub/c.py", "sub/e.py", "sub/templates"}


def test_generated_deps_match_the_closure_and_catch_causal_imports():
    doc = dvcsync.build(ROOT)
    deps = doc["stages"]["causal_kl-batchtopk"]["deps"]
    assert {"src/crossdiff/causal.py", "src/crossdiff/latents.py"} <= set(deps)
    eval_set = doc["stages"]["generate_eval_set"]["deps"]  # eval-set building (and its data.py) moved out of causal
    assert {"src/crossdiff/eval_set.py", "src/crossdiff/data.py"} <= set(eval_set)
    report = doc["stages"]["render_report"]["deps"]
    assert {"src/crossdiff/report/templates", "src/crossdiff/report/static"} <= set(report)
