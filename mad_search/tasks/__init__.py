"""Tasks: the six MAD tasks (mad-lab), zoology's MQAR, and language modelling on local text.

Public API::

    names()                              -> the task names (built-ins first, then plug-ins)
    defaults(name)                       -> the default settings (== conf/task/<name>.yaml)
    validate(name, **settings)           -> resolved settings, or TaskError (one line)
    info(name, **settings)               -> TaskInfo(vocab_size, seq_len, encoder_decoder,
                                                     num_classes)
    build(name, seed=0, cache=True, **settings)
                                         -> datasets.DatasetDict: train / validation / test,
                                            int columns ``inputs`` and ``targets``
    as_tensors(data)                     -> {split: (inputs, targets)} as LongTensors
    grid(name=None)                      -> mad-lab's 66-setting difficulty grid
    accuracy / AccuracyMeter             -> macro (mad-lab) or micro accuracy (tasks.metrics)
    register(name, order=None)           -> decorator: add a task (mad_search.tasks.registry)

Adding a task: one module in this package whose ``@register`` factory returns a :class:`Task`
(every module here that is not infrastructure is imported with the package), plus its
``conf/task/<name>.yaml`` for the ``task=<name>`` config group. A task in another package is
found through the ``mad_search.tasks`` entry-point group (see :mod:`mad_search.tasks.registry`
and README "Add a new task").

Conventions: ``targets[t]`` is what the model must predict after reading ``inputs[: t + 1]``;
``-100`` marks a position with no loss and no score. Compression is the exception: an
encoder-decoder reconstructs the whole clean input. Each task module's docstring gives its exact
format and any deliberate difference from mad-lab or zoology. The validation split is drawn like
the test split but separately, for model selection; the test split is only reported.

``datasets`` never reaches the network: this package sets HF_DATASETS_OFFLINE and HF_HUB_OFFLINE
before importing it. It is imported on first use (building or loading a task), not with this
package: a Hogwild worker, which gets its task data from the coordinator, never imports it.
"""

from __future__ import annotations

import importlib as _importlib
import os
import pkgutil as _pkgutil
from typing import TYPE_CHECKING

os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ["HF_HUB_OFFLINE"] = "1"

import numpy as np  # noqa: E402
import torch  # noqa: E402

from mad_search.tasks import grid as _grid  # noqa: E402
from mad_search.tasks.cache import cache_key, load_or_build  # noqa: E402
from mad_search.tasks.metrics import AccuracyMeter, accuracy  # noqa: E402
from mad_search.tasks.registry import (  # noqa: E402
    ENTRY_POINT_GROUP,
    get,
    load_entry_points,
    names,
    register,
)
from mad_search.tasks.splits import to_table  # noqa: E402
from mad_search.tasks.task import IGNORE_INDEX, Task, TaskError, TaskInfo, fail  # noqa: E402

# Built-in tasks register themselves on import: every module of this package except the
# infrastructure ones below is a task module (adding a task is adding one file and its YAML).
_NOT_TASKS = {"cache", "grid", "metrics", "registry", "splits", "task", "data"}
for _info in sorted(_pkgutil.iter_modules(__path__), key=lambda m: m.name):
    if _info.name not in _NOT_TASKS and not _info.name.startswith("_"):
        _importlib.import_module(f"{__name__}.{_info.name}")

if TYPE_CHECKING:
    import datasets


def load_datasets():
    """The ``datasets`` module, offline (imported here on first use)."""
    import datasets

    # In case ``datasets`` was imported before this package: its offline switches are read at
    # import.
    datasets.config.HF_HUB_OFFLINE = True
    datasets.config.HF_DATASETS_OFFLINE = True
    return datasets


__all__ = [
    "ENTRY_POINT_GROUP", "IGNORE_INDEX", "AccuracyMeter", "Task", "TaskError", "TaskInfo",
    "accuracy", "as_tensors", "build", "defaults", "get", "grid", "info", "load_entry_points",
    "names", "register", "validate",
]

MAX_VOCAB = 2**31 - 1
SPLITS = ("train", "validation", "test")


def defaults(name: str) -> dict:
    """The default settings of a task (``None`` where a default is derived, e.g.
    ``num_valid_examples`` = ``num_test_examples``)."""
    return dict(get(name).defaults)


def validate(name: str, /, **settings) -> dict:
    """The full settings for ``name`` (defaults filled in and normalised), or :class:`TaskError`.

    A ``name`` entry equal to the task name is accepted and dropped (config groups carry it).
    """
    task = get(name)
    if "name" in settings and settings["name"] == name:
        settings.pop("name")
    unknown = sorted(set(settings) - set(task.defaults))
    if unknown:
        raise fail(name, f"unknown setting{'s' if len(unknown) > 1 else ''} "
                         f"{', '.join(unknown)}; valid settings: {', '.join(task.defaults)}")
    resolved = task.check({**task.defaults, **settings})
    if resolved.get("vocab_size", 0) > MAX_VOCAB:  # token ids are stored as int32
        raise fail(name, f"vocab_size={resolved['vocab_size']} is above {MAX_VOCAB}")
    return resolved


def info(name: str, /, **settings) -> TaskInfo:
    """Vocabulary, input length, encoder-decoder flag and metric classes of a task."""
    return get(name).info(validate(name, **settings))


def _check_seed(seed) -> int:
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise TaskError(f"seed must be a non-negative integer, got {seed!r}")
    return int(seed)


def build(name: str, /, seed: int = 0, cache: bool = True,
          **settings) -> datasets.DatasetDict:
    """The task's train / validation / test splits (cached on disk unless ``cache=False``)."""
    task = get(name)
    resolved = validate(name, **settings)
    seed = _check_seed(seed)

    datasets = load_datasets()

    def make() -> datasets.DatasetDict:
        arrays = _checked_splits(name, task.splits(resolved, seed), task.info(resolved))
        return datasets.DatasetDict({
            split: datasets.Dataset(datasets.table.InMemoryTable(to_table(*arrays[split])))
            for split in SPLITS
        })

    if not cache:
        return make()
    key = cache_key(name, resolved, seed, task.identity(resolved))
    return load_or_build(name, key, make)


def _checked_splits(name: str, arrays, task_info: TaskInfo) -> dict:
    """``arrays`` if it keeps the splits contract (every split, ``(examples, seq_len)`` integer
    inputs and targets of one shape), else a one-line :class:`TaskError` (a plug-in's bug)."""
    if not isinstance(arrays, dict) or not set(SPLITS) <= set(arrays):
        got = sorted(arrays) if isinstance(arrays, dict) else type(arrays).__name__
        raise fail(name, f"splits() must return {{{', '.join(SPLITS)}}} -> (inputs, targets); "
                         f"got {got}")
    for split in SPLITS:
        pair = arrays[split]
        if not isinstance(pair, (tuple, list)) or len(pair) != 2:
            raise fail(name, f"splits()[{split!r}] must be a pair (inputs, targets)")
        inputs, targets = (np.asarray(a) for a in pair)
        for label, a in (("inputs", inputs), ("targets", targets)):
            if a.ndim != 2 or a.shape[1] != task_info.seq_len or a.dtype.kind not in "iu":
                raise fail(name, f"splits()[{split!r}] {label} must be (examples, "
                                 f"{task_info.seq_len}) integers, got {a.dtype} {a.shape}")
        if inputs.shape != targets.shape:
            raise fail(name, f"splits()[{split!r}] inputs {inputs.shape} and targets "
                             f"{targets.shape} differ in shape")
    return arrays


def as_tensors(data: datasets.DatasetDict) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """``{split: (inputs, targets)}`` as ``(examples, seq_len)`` int64 tensors."""
    out = {}
    for split, ds in data.items():
        table = ds.with_format("arrow")[:]  # respects any select/shuffle applied to ds
        pair = []
        for name in ("inputs", "targets"):
            column = table.column(name).combine_chunks()
            flat = column.flatten().to_numpy(zero_copy_only=False)
            width = getattr(column.type, "list_size", -1)
            pair.append(torch.from_numpy(flat.reshape(len(column), width).astype(np.int64)))
        out[split] = tuple(pair)
    return out


def grid(name: str | None = None) -> list[dict]:
    """mad-lab's difficulty grid: ``[{"id", "task", "seed", "varied", "settings"}, ...]``.

    66 entries over the six MAD tasks (each task's baseline, then one setting changed at a time),
    with mad-lab's seed 12345. ``name`` restricts it to one task.
    """
    raw = _grid.load_grid()
    if name is not None and name not in raw["tasks"]:
        get(name)  # unknown name: the usual error
        raise TaskError(f"task {name} has no difficulty grid; grids exist for "
                        f"{', '.join(raw['tasks'])}")
    return _grid.expand(raw, validate, name)
