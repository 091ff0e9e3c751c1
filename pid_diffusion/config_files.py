"""How configuration files are read, and where the presets of every task are: `configs/<task>/<name>.json`.

A preset holds only what differs from the defaults of its task's dataclasses (config.py, distill.py,
teacher_training.py), as EDM2's preset table and nanoGPT's config files do. `"_doc"` keys say why a value is
what it is and are dropped on reading; `"_base": "other.json"` starts from another file of the same folder
(the central-difference variants start from their paper run). A run folder's `config.json` is a
configuration file too: it holds every value, so `--config=<run>/config.json` replays its run.

    config = load(DistillConfig, preset_file("distill", "cifar10"), {"train.lr": "1e-4"})
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from typing import Any, TypeVar

from pid_diffusion.utils import fileio
from pid_diffusion.config import ConfigError, apply_overrides

__all__ = ["PRESETS_DIR", "load", "preset_file", "preset_names", "read_config_file"]

C = TypeVar("C")

def _presets_dir() -> str:
    """configs/ of the repository; setup.py installs it as package data `pid_diffusion/configs`, found first."""
    package = os.path.dirname(os.path.abspath(__file__))
    installed = os.path.join(package, "configs")
    return installed if os.path.isdir(installed) else os.path.join(os.path.dirname(package), "configs")


PRESETS_DIR = _presets_dir()


def preset_names(task: str) -> list[str]:
    """The presets of `task` ("distill", "teacher"): the names of its files in configs/<task>/."""
    return sorted(name[:-len(".json")] for name in os.listdir(os.path.join(PRESETS_DIR, task))
                  if name.endswith(".json"))


def preset_file(task: str, name: str) -> str:
    """The file of preset `name` of `task`, or a ConfigError listing the presets."""
    if name not in preset_names(task):
        raise ConfigError(f"unknown preset {name!r}: choose one of {', '.join(preset_names(task))}")
    return os.path.join(PRESETS_DIR, task, f"{name}.json")


def read_config_file(path: str) -> dict[str, Any]:
    """A configuration file as a dictionary: `_doc` keys dropped, a `_base` file (beside it) merged under it."""
    try:
        data = json.loads(fileio.read_bytes(path).decode("utf-8"))
    except (FileNotFoundError, json.JSONDecodeError) as error:
        raise ConfigError(f"cannot read the configuration file {path}: {error}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a JSON object of sections, got {type(data).__name__}")
    base = data.pop("_base", None)
    merged = _merge(read_config_file(_beside(path, base)) if base else {}, data)
    return _without_docs(merged)


def _beside(path: str, name: str) -> str:
    """The file `name` in the folder of `path` (a local path or a blob URL)."""
    return f"{path.rsplit('/', 1)[0]}/{name}" if "/" in path else name


def _merge(base: dict[str, Any], top: Mapping[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in top.items():
        both = isinstance(value, Mapping) and isinstance(merged.get(key), Mapping)
        merged[key] = _merge(merged[key], value) if both else value
    return merged


def _without_docs(data: Mapping[str, Any]) -> dict[str, Any]:
    return {key: _without_docs(value) if isinstance(value, Mapping) else value
            for key, value in data.items() if key != "_doc"}


def load(cls: type[C], path: str, overrides: Mapping[str, str] | None = None) -> C:
    """The configuration of file `path` (a preset or a run folder's config.json) with `overrides` applied."""
    return apply_overrides(cls, read_config_file(path), overrides or {})
