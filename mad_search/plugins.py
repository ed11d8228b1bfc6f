"""Loading an entry-point group of plug-ins (``mad_search.blocks``, ``mad_search.tasks``).

An entry point names a module, whose import registers what it defines through the registry's
decorator, or an object (a class, a factory, a record) that the registry registers under the
entry point's own name. A broken entry point is a one-line user error that names it.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from importlib.metadata import entry_points
from typing import Any

from mad_search.errors import UserError


def one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split()) or type(exc).__name__


def load_group(group: str, error: type[UserError], add: Callable[[str, Any], None]) -> None:
    """Load every entry point of ``group``: a module is imported; any other object is handed
    to ``add(ep.name, obj)``, whose ``error`` is prefixed with the entry point it came from."""
    for ep in entry_points(group=group):
        where = f"entry point {ep.name!r} ({ep.value}) in group {group}"
        try:
            obj = ep.load()
        except Exception as exc:  # a broken plug-in: one line, naming it
            raise error(f"{where} failed to import: {one_line(exc)}") from exc
        if inspect.ismodule(obj):
            continue  # importing it ran its registry decorators
        try:
            add(ep.name, obj)
        except error as exc:
            raise error(f"{where}: {exc}") from exc
