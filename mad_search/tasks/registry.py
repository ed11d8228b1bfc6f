"""The task registry: one name -> one :class:`~mad_search.tasks.task.Task`.

A task registers itself with a decorator on a zero-argument factory that returns its ``Task``::

    from mad_search.tasks import Task, TaskInfo, register

    @register("my_task")
    def my_task() -> Task:
        return Task(name="my_task", defaults={...}, check=..., info=..., splits=...)

The factory is called once, when the decorator runs (at import); the decorator returns it
unchanged. Any zero-argument callable returning a ``Task`` will do (a ``Task`` subclass too).

Built-in tasks: every module of ``mad_search.tasks`` that is not infrastructure is imported when
the package is (adding a task is adding one module, plus its ``conf/task/<name>.yaml``).
Third-party tasks: the ``mad_search.tasks`` entry-point group, loaded once, on the first call
that needs the task table (``names()``, ``build()``, ``validate()``...). An entry point names

- a module (``my_task = "my_pkg.tasks"``): importing it runs its ``@register`` decorators;
- or an object (``my_other = "my_pkg.tasks:my_other"``): a ``Task`` or a zero-argument factory of
  one, registered under the entry point's own name (the ``Task``'s ``name`` must be that name).
  An object its decorator already registered under that name is left as it is.

Order (:func:`names`): by ``order`` (the built-ins use 10, 20, ... 80), then by name; tasks
registered without an ``order`` (plug-ins, usually) come after every task that has one.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from mad_search.plugins import load_group, one_line
from mad_search.tasks.task import Task, TaskError

ENTRY_POINT_GROUP = "mad_search.tasks"
_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_-]*")


@dataclass(frozen=True)
class _Entry:
    task: Task
    source: Any  # the factory (or the Task itself) that registered it
    order: float


_REGISTRY: dict[str, _Entry] = {}
_entry_points_loaded = False


def register(name: str, *, order: float | None = None) -> Callable:
    """Decorator: register the :class:`Task` that the decorated zero-argument factory returns.

    ``order`` places the task in :func:`names` (lower first); without it the task comes after
    every task that has one. Registering a name that another factory already holds is refused
    with a one-line :class:`TaskError` naming both; the same factory again (or its new version
    after ``importlib.reload``) replaces the old task.
    """

    def deco(factory):
        add(name, factory, order=order)
        return factory

    return deco


def add(name: str, source: Task | Callable[[], Task], *, order: float | None = None) -> Task:
    """Register ``source`` (a :class:`Task`, or a zero-argument callable returning one) under
    ``name`` and return the task. What :func:`register` and the entry points call."""
    if not isinstance(name, str) or not _NAME.fullmatch(name):
        raise TaskError(f"task name {name!r} is not valid: use letters, digits, '_' or '-', "
                        "starting with a letter or '_'")
    if order is not None and (isinstance(order, bool) or not isinstance(order, (int, float))
                              or math.isnan(order)):
        raise TaskError(f"task {name}: order must be a number, got {order!r}")
    old = _REGISTRY.get(name)
    if old is not None and old.source is not source and _origin(old.source) != _origin(source):
        raise TaskError(f"task name {name!r} is already registered by {_origin(old.source)}; "
                        f"{_origin(source)} cannot register it too; choose another name")
    task = source if isinstance(source, Task) else source()
    if not isinstance(task, Task):
        raise TaskError(f"task {name}: {_origin(source)} returned {type(task).__name__}, not a "
                        "mad_search.tasks.Task")
    if task.name != name:
        raise TaskError(f"task {name}: {_origin(source)} is registered as {name!r} but its Task "
                        f"is named {task.name!r}; use one name")
    # a new name, the same factory again, or its module reloaded: (re)place it
    _REGISTRY[name] = _Entry(task, source, math.inf if order is None else float(order))
    return task


def _origin(obj: Any) -> str:
    """``module.qualname`` of a factory; a Task says whose ``splits`` it carries."""
    if isinstance(obj, Task):
        fn = obj.splits
        return (f"Task({obj.name!r}) of {getattr(fn, '__module__', '?')}."
                f"{getattr(fn, '__qualname__', type(fn).__name__)}")
    qualname = getattr(obj, "__qualname__", None) or type(obj).__qualname__
    return f"{getattr(obj, '__module__', type(obj).__module__)}.{qualname}"


def load_entry_points() -> None:
    """Load every entry point of the ``mad_search.tasks`` group (once per process)."""
    global _entry_points_loaded
    if _entry_points_loaded:
        return
    _entry_points_loaded = True
    load_group(ENTRY_POINT_GROUP, TaskError, _add_entry_point)


def _add_entry_point(name: str, obj: Any) -> None:
    if not (isinstance(obj, Task) or callable(obj)):
        raise TaskError(f"names a {type(obj).__name__}; expected a module, a Task or a "
                        "zero-argument factory returning a Task")
    held = _REGISTRY.get(name)
    if held is not None and held.source is obj:
        return  # its decorator registered it under this very name
    try:
        add(name, obj)
    except TaskError:
        raise  # refused (name taken, not a Task...)
    except Exception as exc:  # the factory itself failed
        raise TaskError(f"{_origin(obj)} failed: {one_line(exc)}") from exc


def names() -> list[str]:
    """Every task name: by ``order``, then by name; unordered tasks last."""
    load_entry_points()
    return sorted(_REGISTRY, key=lambda name: (_REGISTRY[name].order, name))


def get(name: str) -> Task:
    """The task registered under ``name``; a one-line error listing valid names otherwise."""
    load_entry_points()
    entry = _REGISTRY.get(name) if isinstance(name, str) else None
    if entry is None:
        raise TaskError(f"unknown task {name!r}; valid tasks: {', '.join(names())}")
    return entry.task
