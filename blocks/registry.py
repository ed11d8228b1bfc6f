"""The block registry: one name -> one block class (or factory).

Built-in blocks register themselves when ``blocks`` is imported. Third-party blocks are found
through the ``mad_search.blocks`` entry-point group (each entry point names a module to import,
whose import registers its blocks) or through module paths named in the config
(``blocks.load_module("my_pkg.my_block")``). Neither needs an edit in this repository.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from importlib.metadata import entry_points
from typing import Any

from torch import nn

ENTRY_POINT_GROUP = "mad_search.blocks"

_REGISTRY: dict[str, Callable[..., nn.Module]] = {}
_MLX_REGISTRY: dict[str, Callable[..., Any]] = {}
_entry_points_loaded = False


class BlockError(ValueError):
    """A block name, option or registration that cannot be honoured (a user error)."""


def register(name: str, *, backend: str = "torch") -> Callable:
    """Class decorator that adds a block type under ``name``.

    The class is built as ``Cls(d_model, max_len, block_index=..., num_blocks=..., **overrides)``.
    Registering a name twice is refused.
    """
    table = _REGISTRY if backend == "torch" else _MLX_REGISTRY

    def deco(cls):
        if name in table and table[name] is not cls:
            raise BlockError(
                f"block name {name!r} is already registered by "
                f"{table[name].__module__}.{table[name].__qualname__}; choose another name"
            )
        table[name] = cls
        return cls

    return deco


def load_entry_points() -> None:
    """Import every module advertised in the ``mad_search.blocks`` entry-point group (once)."""
    global _entry_points_loaded
    if _entry_points_loaded:
        return
    _entry_points_loaded = True
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        try:
            ep.load()
        except Exception as exc:  # a broken plugin must not break the built-in blocks
            raise BlockError(
                f"entry point {ep.name!r} ({ep.value}) in group {ENTRY_POINT_GROUP} failed to "
                f"import: {exc}"
            ) from exc


def load_module(path: str) -> None:
    """Import a module by dotted path so the blocks it defines register themselves."""
    try:
        importlib.import_module(path)
    except ImportError as exc:
        raise BlockError(f"block module {path!r} could not be imported: {exc}") from exc


def names(backend: str = "torch") -> list[str]:
    """Every registered block type, sorted."""
    load_entry_points()
    return sorted(_REGISTRY if backend == "torch" else _MLX_REGISTRY)


def get(name: str, backend: str = "torch") -> Callable[..., Any]:
    """The class registered under ``name``; a clear error listing valid names otherwise."""
    load_entry_points()
    if backend == "mlx":
        _import_mlx_twins()
    table = _REGISTRY if backend == "torch" else _MLX_REGISTRY
    if backend not in ("torch", "mlx"):
        raise BlockError(f"unknown backend {backend!r}; valid: torch, mlx")
    if name not in table:
        raise BlockError(f"unknown block {name!r}; valid blocks: {', '.join(sorted(table))}")
    return table[name]


def build(name: str, d_model: int, max_len: int, backend: str = "torch", **overrides: Any):
    """Build one block that maps ``(batch, seq, d_model) -> (batch, seq, d_model)``, causally."""
    if not isinstance(d_model, int) or d_model <= 0:
        raise BlockError(f"d_model must be a positive integer, got {d_model!r}")
    if not isinstance(max_len, int) or max_len <= 0:
        raise BlockError(f"max_len must be a positive integer, got {max_len!r}")
    cls = get(name, backend)
    try:
        return cls(d_model, max_len, **overrides)
    except TypeError as exc:
        raise BlockError(f"block {name!r}: bad options {sorted(overrides)}: {exc}") from exc


def _import_mlx_twins() -> None:
    try:
        importlib.import_module("blocks.mlx")
    except ImportError as exc:
        raise BlockError(
            f"backend 'mlx' needs the mlx extra (pip install 'mad-search[mlx]'): {exc}"
        ) from exc
