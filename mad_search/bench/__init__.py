"""Benchmarks: commands that print a table and write a JSON file.

    python -m mad_search.bench NAME [key=value ...] [out=PATH]

A benchmark is a module with three things:

- ``DEFAULTS``: its options and their default values (the defaults also fix each option's type);
- ``run(**options) -> dict``: measure, and return a JSON-ready result;
- ``table(result) -> str``: the result as a table for the terminal;
- optionally ``plot(result, path) -> path``: a PNG written beside the JSON (same name, ``.png``).

Register one by adding a line to :data:`BENCHMARKS`; the module is imported only when its
benchmark runs. ``out=`` is common to all benchmarks: a ``.json`` file path, or a directory that
receives ``bench_NAME.json``; without it the file goes into the current (run) directory.
Timings are never asserted anywhere; the JSON carries the numbers and the ratios.
"""

from __future__ import annotations

import importlib
import json
import re
import sys
from pathlib import Path
from typing import Any

import yaml

from mad_search.errors import UserError

BENCHMARKS: dict[str, str] = {
    "blocks": "mad_search.bench.blocks",
    "scaling": "mad_search.bench.scaling",
    "vs_independent": "mad_search.bench.vs_independent",
    "sharing": "mad_search.bench.sharing",
    "protocol": "mad_search.bench.protocol",
    "agreement": "mad_search.bench.agreement",
    "storage": "mad_search.bench.storage",
    "faults": "mad_search.bench.faults",
    "step": "mad_search.bench.step",
    "mixed": "mad_search.bench.mixed",
    "hogwild_train": "mad_search.bench.hogwild_train",
}
"""Benchmark name -> module that implements it (``DEFAULTS``, ``run``, ``table``)."""


class BenchError(UserError):
    """A benchmark name or option that cannot be honoured (a user error: one line, exit code 2)."""


def parse_overrides(args: list[str]) -> dict[str, Any]:
    """Turn ``["seq_lens=[128,256]", "iters=3"]`` into ``{"seq_lens": [128, 256], "iters": 3}``.

    Values are read as YAML, so ints, floats, booleans, lists and bare strings all work (plus
    floats such as ``5e-4`` that YAML 1.1 would leave as strings). A later ``key=`` wins.
    """
    overrides: dict[str, Any] = {}
    for arg in args:
        key, sep, text = arg.partition("=")
        key = key.strip()
        if not sep or not key:
            raise BenchError(f"expected key=value, got {arg!r}")
        try:
            value = _numbers(yaml.safe_load(text)) if text.strip() else ""
        except yaml.YAMLError as exc:
            first_line = str(exc).splitlines()[0]
            raise BenchError(f"option {key}: cannot read value {text!r} ({first_line})") from None
        overrides[key] = value
    return overrides


_EXPONENT_FLOAT = re.compile(r"[+-]?(\d+\.?\d*|\.\d+)[eE][+-]?\d+")


def _numbers(value: Any) -> Any:
    """Read strings that Python takes as a number (``5e-4``, ``1e3``) as floats."""
    if isinstance(value, list):
        return [_numbers(v) for v in value]
    if isinstance(value, str) and _EXPONENT_FLOAT.fullmatch(value.strip()):
        return float(value)
    return value


def resolve_options(name: str, defaults: dict[str, Any], overrides: dict[str, Any]) -> dict:
    """Defaults updated by overrides, each override checked against its default's type."""
    unknown = sorted(set(overrides) - set(defaults))
    if unknown:
        raise BenchError(
            f"unknown option {unknown[0]!r} for benchmark {name!r}; "
            f"valid: {', '.join(sorted(defaults))}, out"
        )
    options = dict(defaults)
    for key, value in overrides.items():
        options[key] = _coerce(key, value, defaults[key])
    return options


def _coerce(key: str, value: Any, default: Any) -> Any:
    """``value`` as the type of ``default``; a scalar is accepted where a list is expected."""

    def bad(expected: str) -> BenchError:
        return BenchError(f"option {key} must be {expected}, got {value!r}")

    if isinstance(default, bool):
        if not isinstance(value, bool):
            raise bad("true or false")
        return value
    if isinstance(default, int):
        if isinstance(value, bool) or not isinstance(value, int):
            raise bad("an integer")
        return value
    if isinstance(default, float):
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise bad("a number")
        return float(value)
    if isinstance(default, str):
        if isinstance(value, (list, dict)):
            raise bad("a string")
        return "" if value is None else str(value)
    if isinstance(default, dict):
        if not isinstance(value, dict):
            raise bad("a mapping, e.g. {mlstm: {cell: parallel}}")
        return value
    if isinstance(default, list):
        items = value if isinstance(value, list) else [value]
        item_type = type(default[0]) if default else None
        if item_type is int and any(isinstance(v, bool) or not isinstance(v, int) for v in items):
            raise bad("an integer or a list of integers, e.g. [128,256]")
        if item_type is None or item_type is str:
            if any(isinstance(v, (list, dict)) for v in items):
                raise bad("a name or a list of names, e.g. [mlstm,slstm]")
            items = [str(v) for v in items]
        return items
    return value


def compose_config(overrides: list[str]):
    """The package's ``config`` composed with Hydra overrides (Hydra's compose API; works
    whether or not Hydra is initialised), struct mode off so benchmarks can set their keys."""
    from hydra import compose, initialize_config_module
    from hydra.core.global_hydra import GlobalHydra
    from omegaconf import OmegaConf

    if GlobalHydra.instance().is_initialized():
        cfg = compose("config", overrides=overrides)
    else:
        with initialize_config_module(config_module="conf", version_base="1.3"):
            cfg = compose("config", overrides=overrides)
    OmegaConf.set_struct(cfg, False)
    return cfg


def _load(name: str):
    if name not in BENCHMARKS:
        raise BenchError(f"unknown benchmark {name!r}; valid: {', '.join(sorted(BENCHMARKS))}")
    return importlib.import_module(BENCHMARKS[name])


def output_path(name: str, out: Any = None) -> Path:
    """Where ``bench_NAME.json`` goes: ``out`` (a .json file or a directory) or the cwd."""
    if out is None or out == "":
        return Path.cwd() / f"bench_{name}.json"
    path = Path(str(out)).expanduser()
    if path.suffix == ".json":
        return path
    return path / f"bench_{name}.json"


def run_benchmark(
    name: str, overrides: dict[str, Any] | None = None, out: Any = None
) -> tuple[dict, Path]:
    """Run benchmark ``name`` with ``overrides``; write its JSON; return (result, path)."""
    module = _load(name)
    options = resolve_options(name, module.DEFAULTS, dict(overrides or {}))
    path = output_path(name, out)
    result = module.run(**options)
    result = {"benchmark": name, **result}
    path.parent.mkdir(parents=True, exist_ok=True)
    if hasattr(module, "plot"):  # a benchmark with a figure writes it beside its JSON
        result["plot"] = str(module.plot(result, path.with_suffix(".png")))
    path.write_text(json.dumps(result, indent=2) + "\n")
    return result, path


def usage() -> str:
    lines = ["usage: python -m mad_search.bench NAME [key=value ...] [out=PATH]", "", "benchmarks:"]
    for name, module_name in sorted(BENCHMARKS.items()):
        lines.append(f"  {name:<16} ({module_name})")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point; returns the exit code (2 for a user error)."""
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(usage(), file=sys.stdout if argv else sys.stderr)
        return 0 if argv else 2
    name, rest = argv[0], argv[1:]
    try:
        overrides = parse_overrides(rest)
        out = overrides.pop("out", None)
        module = _load(name)
        result, path = run_benchmark(name, overrides, out)
    except UserError as exc:  # a bad option, or a bad setting found by the code it runs
        print(f"mad_search.bench: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # no JSON of a part-run benchmark (one that keeps studies resumes)
        print("mad_search.bench: interrupted; nothing written", file=sys.stderr)
        return 130
    print(module.table(result))
    print(f"wrote {path}")
    return 0
