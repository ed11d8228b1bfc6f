"""mad-lab's difficulty grid, read from ``conf/grid/mad.yaml``.

Per MAD task: the baseline setting, then one setting changed at a time (vocabulary, sequence
length, training-set size, noise fraction, tokens to copy), 66 settings over the six tasks.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path
from typing import Any

import yaml

GRID_FILE = ("grid", "mad.yaml")


def conf_path(*parts: str) -> Path:
    """A file in the ``conf`` tree: the installed ``conf`` package, else the repository's."""
    try:
        candidate = resources.files("conf")
        for part in parts:
            candidate = candidate / part
        if candidate.is_file():
            return Path(str(candidate))
    except (ModuleNotFoundError, TypeError):
        pass
    return Path(__file__).resolve().parents[2].joinpath("conf", *parts)


def load_grid() -> dict[str, Any]:
    with open(conf_path(*GRID_FILE), encoding="utf-8") as f:
        return yaml.safe_load(f)


def expand(raw: dict[str, Any], validate, name: str | None = None) -> list[dict[str, Any]]:
    """Entries ``{"id", "task", "seed", "varied", "settings"}``; ``varied`` is None for baselines.

    ``settings`` are fully resolved (``validate(task, **overrides)``) so an entry can be passed
    straight to ``build(entry["task"], seed=entry["seed"], **entry["settings"])``.
    """
    seed = int(raw["seed"])
    out = []
    for task, spec in raw["tasks"].items():
        if name is not None and task != name:
            continue
        baseline = dict(spec["baseline"])
        out.append({"id": f"{task}/baseline", "task": task, "seed": seed, "varied": None,
                    "settings": validate(task, **baseline)})
        for key, values in spec["changes"].items():
            for value in values:
                out.append({"id": f"{task}/{key}={value}", "task": task, "seed": seed,
                            "varied": key, "settings": validate(task, **{**baseline, key: value})})
    return out
