"""The block registry: one name -> one block class (or factory).

Built-in blocks register themselves when ``blocks`` is imported. Third-party blocks are found
through the ``mad_search.blocks`` entry-point group or through module paths named in the config
(``blocks.load_module("my_pkg.my_block")``). Neither needs an edit in this repository. An entry
point names either

- a module (``my_ema = "my_pkg.ema"``), whose import runs its ``@register`` decorators
  (the entry point's name is then only a label), or
- a class or factory (``my_mixer = "my_pkg.blocks:MyMixer"``, the form pytest-style plug-in hosts
  use), registered under the entry point's own name; one that its ``@register`` decorator already
  registered under that name is left as it is.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any

from torch import nn

from blocks.base import BlockError
from mad_search.plugins import load_group

ENTRY_POINT_GROUP = "mad_search.blocks"

_REGISTRY: dict[str, Callable[..., nn.Module]] = {}
_MLX_REGISTRY: dict[str, Callable[..., Any]] = {}
_entry_points_loaded = False


def register(name: str, *, backend: str = "torch") -> Callable:
    """Class decorator that adds a block type under ``name``.

    The class is built as ``Cls(d_model, max_len, block_index=..., num_blocks=..., **overrides)``.
    Registering a name that another class already holds is refused, naming both classes and
    their modules; the same class again (or a new version of it from ``importlib.reload``) replaces
    the old one. Every block type is checked against the block contract (:mod:`blocks.contract`)
    the first time it is built.
    """
    table = _REGISTRY if backend == "torch" else _MLX_REGISTRY

    def deco(cls):
        old = table.get(name)
        if old is not None and old is not cls and _qualified(old) != _qualified(cls):
            raise BlockError(
                f"block name {name!r} is already registered by {_qualified(old)}; "
                f"{_qualified(cls)} cannot register it too; choose another name"
            )
        table[name] = cls  # the same class again, or its module reloaded: replace it
        return cls

    return deco


def _qualified(obj: Any) -> str:
    return f"{obj.__module__}.{getattr(obj, '__qualname__', getattr(obj, '__name__', obj))}"


def load_entry_points() -> None:
    """Load every entry point of the ``mad_search.blocks`` group (once per process): a module is
    imported (its decorators register its blocks); a class or factory is registered under the
    entry point's name, unless it already holds that name."""
    global _entry_points_loaded
    if _entry_points_loaded:
        return
    _entry_points_loaded = True
    load_group(ENTRY_POINT_GROUP, BlockError, _add_entry_point)


def _add_entry_point(name: str, obj: Any) -> None:
    if not callable(obj):
        raise BlockError(
            f"names a {type(obj).__name__}; expected a module, or a block class or factory"
        )
    if _REGISTRY.get(name) is not obj:  # else its @register decorator already did
        register(name)(obj)


def load_module(path: str) -> None:
    """Import a module by dotted path so the blocks it defines register themselves."""
    try:
        importlib.import_module(path)
    except ImportError as exc:
        raise BlockError(f"block module {path!r} could not be imported: {exc}") from exc


def names(backend: str = "torch") -> list[str]:
    """Every registered block type of ``backend`` ("torch" or "mlx"), sorted."""
    load_entry_points()
    _check_backend(backend)
    if backend == "mlx":
        _import_mlx_twins()
    return sorted(_REGISTRY if backend == "torch" else _MLX_REGISTRY)


def get(name: str, backend: str = "torch") -> Callable[..., Any]:
    """The class registered under ``name``; a clear error listing valid names otherwise."""
    load_entry_points()
    _check_backend(backend)
    if backend == "mlx":
        _import_mlx_twins()
    table = _REGISTRY if backend == "torch" else _MLX_REGISTRY
    if name not in table:
        raise BlockError(f"unknown block {name!r}; valid blocks: {', '.join(sorted(table))}")
    return table[name]


def build(name: str, d_model: int, max_len: int, backend: str = "torch", **overrides: Any):
    """Build one block that maps ``(batch, seq, d_model) -> (batch, seq, d_model)``, causally.

    The first build of a block type (class + options) in a process runs the contract check
    (:func:`blocks.contract.check_block`); a block that breaks the contract is refused with a
    one-line :class:`BlockError`.
    """
    if not isinstance(d_model, int) or d_model <= 0:
        raise BlockError(f"d_model must be a positive integer, got {d_model!r}")
    if not isinstance(max_len, int) or max_len <= 0:
        raise BlockError(f"max_len must be a positive integer, got {max_len!r}")
    cls = get(name, backend)
    try:
        block = cls(d_model, max_len, **overrides)
    except TypeError as exc:
        raise BlockError(f"block {name!r}: bad options {sorted(overrides)}: {exc}") from exc
    if backend == "torch":
        _check_contract_once(name, cls, block, d_model, max_len, overrides)
    return block


# Block types (class + options) that passed the contract check in this process.
_CHECKED: set[tuple[Any, str]] = set()
_STACK_POSITION = ("block_index", "num_blocks")  # only the initialisation depends on these


def _check_contract_once(name: str, cls: Callable, block: Any, d_model: int, max_len: int,
                         overrides: dict[str, Any]) -> None:
    """Run :func:`blocks.contract.check_block` the first time ``cls`` is built with these options
    in this process (``MAD_SEARCH_SKIP_CONTRACT=1`` skips it, for debugging only)."""
    from blocks import contract

    options = {k: v for k, v in overrides.items() if k not in _STACK_POSITION}
    key = (cls, repr(sorted(options.items())))
    if key in _CHECKED or contract.skipped():
        return
    tensors = [*block.parameters(), *block.buffers()] if hasattr(block, "parameters") else []
    if any(t.is_meta for t in tensors):  # built on the meta device (budget sizing): no data
        return
    contract.check_block(name, block, d_model, max_len, origin=cls)
    _CHECKED.add(key)


def _check_backend(backend: str) -> None:
    if backend not in ("torch", "mlx"):
        raise BlockError(f"unknown backend {backend!r}; valid: torch, mlx")


def _import_mlx_twins() -> None:
    try:
        importlib.import_module("blocks.mlx")
    except ImportError as exc:
        raise BlockError(
            f"backend 'mlx' needs the mlx extra (pip install 'mad-search[mlx]'): {exc}"
        ) from exc
