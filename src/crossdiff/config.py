"""Params: validation against the JSON schema, and the per-stage slices that rules declare."""

from __future__ import annotations

import copy
import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from crossdiff import seeds

ROOT = Path(__file__).resolve().parents[2]
SCHEMA = ROOT / "schemas" / "params.schema.yaml"


class ParamsError(ValueError):
    """A params value is invalid; the message names the key."""


def merge(base: dict, override: Mapping) -> dict:
    """Deep-merge `override` into a copy of `base` (how `--configfile` layers presets)."""
    out = copy.deepcopy(base)
    for key, value in override.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), dict):
            out[key] = merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def load(path: str | Path = ROOT / "params.yaml", *presets: str | Path) -> dict:
    cfg = yaml.safe_load(Path(path).read_text())
    for preset in presets:
        cfg = merge(cfg, yaml.safe_load(Path(preset).read_text()) or {})
    validate(cfg)
    return cfg


def validate(cfg: Mapping, schema_path: str | Path = SCHEMA) -> None:
    """Raise ParamsError naming the offending key (e.g. `crosscoders.batchtopk.k`)."""
    import jsonschema

    schema = yaml.safe_load(Path(schema_path).read_text())
    validator = jsonschema.Draft202012Validator(schema)
    errors = sorted(validator.iter_errors(cfg), key=lambda e: list(e.absolute_path))
    if errors:
        lines = []
        for err in errors:
            key = ".".join(str(p) for p in err.absolute_path) or "<top level>"
            lines.append(f"params key `{key}`: {err.message}")
        raise ParamsError("invalid params:\n  " + "\n  ".join(lines))


def get(cfg: Mapping, dotted: str) -> Any:
    node: Any = cfg
    for part in dotted.split("."):
        if not isinstance(node, Mapping) or part not in node:
            raise KeyError(f"params key `{dotted}` is missing")
        node = node[part]
    return node


def stage_keys(keys: Iterable[str], wildcards: Mapping[str, str]) -> list[str]:
    """One job's params keys: `keys` with its wildcards filled in. A seed replicate (`l1-seed1`, crossdiff.seeds)
    reads its variant's entry, `crosscoders.l1`: Snakemake's params and DVC's both come from here."""
    w = dict(wildcards)
    if "variant" in w:
        w["variant"] = seeds.parse(w["variant"])[0]
    return [k.format(**w) for k in keys]


def select(cfg: Mapping, keys: Iterable[str], **wildcards: str) -> dict:
    """The sub-tree of `cfg` a stage reads (only `keys`, wildcards like {variant} filled in).

    Workflow scripts get exactly this slice, so a stage cannot read a key it did not declare
    (and DVC, which tracks the declared keys, cannot miss a dependency).
    """
    out: dict = {}
    for key in stage_keys(keys, wildcards):
        parts = key.split(".")
        node = out
        for part in parts[:-1]:
            node = node.setdefault(part, {})
        node[parts[-1]] = copy.deepcopy(get(cfg, ".".join(parts)))
    return out


@dataclass(frozen=True)
class Runtime:
    """Where and in what precision a stage runs a language model: params `device` and `models.dtype`.

    Every model-loading stage declares `models` and `device` in STAGES and builds this once from its params
    slice, so `device: cuda:1` reaches all of them (reading it four ways let two stages ignore it). The
    defaults are params.yaml's (a test keeps them equal); they apply only to slices built by hand in tests.
    """

    device: str = "auto"
    dtype: str = "float32"

    @classmethod
    def from_params(cls, params: Mapping, device: str | None = None) -> Runtime:
        """`device`: an explicit override (a script's --device), else params `device`."""
        models = params.get("models", {})
        out = cls(device=device or params.get("device", cls.device), dtype=models.get("dtype", cls.dtype))
        if out.dtype not in DTYPES:
            raise ParamsError(f"params key `models.dtype`: {out.dtype!r} is not one of {list(DTYPES)}")
        return out


DTYPES = ("float32", "bfloat16", "float16")


def dumps(obj: Any) -> str:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"))


def params_factory(config: Mapping, stages: Mapping):
    """For rules' `params:`: rule name -> (wildcards -> JSON of the keys the rule declares)."""

    def params_of(rule_name: str):
        keys = stages[rule_name]
        return lambda wildcards: dumps(select(config, keys, **dict(wildcards.items())))

    return params_of


def log_factory(logs_dir: str, ext: str = ".log"):
    """For rules' `log:` (and, with ext=".tsv", `benchmark:`): one file per job under `logs_dir`."""
    return lambda rule_name, suffix="": f"{logs_dir}/{rule_name}{suffix}{ext}"
