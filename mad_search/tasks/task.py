"""What a task is: its defaults, its settings checks, its shape (:class:`TaskInfo`), its splits.

Every task module (``recall``, ``copying``, ``compression``, ``memorization``, ``mqar``, ``text``,
or a plug-in's) registers one or more :class:`Task` records with
:func:`mad_search.tasks.register` (:mod:`mad_search.tasks.registry` keeps them by name).
Settings are checked here, at the edge, with one-line errors that name the setting and say
what would be valid; the generators trust what they are given.
"""

from __future__ import annotations

import numbers
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from mad_search.errors import UserError

IGNORE_INDEX = -100  # a target that is neither trained on nor scored (PyTorch's default)

# Settings every task has (names as in mad-lab's MADConfig and zoology's configs).
SIZE_KEYS = ("num_train_examples", "num_test_examples", "num_valid_examples")


class TaskError(UserError):
    """A task name or task setting that cannot be honoured. The message is one line."""


@dataclass(frozen=True)
class TaskInfo:
    """What a model needs to know about a task.

    ``vocab_size``: token ids the embedding and head must cover, special tokens included.
    ``seq_len``: length of every ``inputs`` row (and ``targets`` row).
    ``encoder_decoder``: True only for compression (reconstruct the whole input).
    ``num_classes``: classes for the accuracy metric (mad-lab: the model's vocabulary).
    ``objective``: what judges a run: ``accuracy`` (validation accuracy, higher is better: the
    MAD tasks) or ``loss`` (validation cross entropy, lower is better: language modelling, where
    accuracy over thousands of word classes says little).
    ``bytes_per_token``: bytes of text per token where it is fixed (1 for the byte tokenizer), for
    bits per byte; None where it varies (words, BPE).
    """

    vocab_size: int
    seq_len: int
    encoder_decoder: bool = False
    num_classes: int = 0
    objective: str = "accuracy"
    bytes_per_token: float | None = None

    def __post_init__(self) -> None:
        if self.num_classes == 0:
            object.__setattr__(self, "num_classes", self.vocab_size)


Arrays = tuple[np.ndarray, np.ndarray]


@dataclass(frozen=True)
class Task:
    """One task: defaults, a settings check, a shape, and a way to make its splits.

    ``check(settings)`` gets the defaults merged with the user's settings (names already known
    to be valid) and returns them normalised (Python ints/floats/bools, ``None`` resolved) or
    raises :class:`TaskError`.
    ``splits(settings, seed)`` returns ``{"train", "validation", "test"} -> (inputs, targets)``.
    ``identity(settings)`` adds what the settings alone do not pin down (e.g. text files' sizes
    and times) to the cache key.
    """

    name: str
    defaults: Mapping[str, Any]
    check: Callable[[dict], dict]
    info: Callable[[dict], TaskInfo]
    splits: Callable[[dict, int], dict[str, Arrays]]
    identity: Callable[[dict], Any] = field(default=lambda settings: None)


# ---- setting checks -------------------------------------------------------------------------


def fail(task: str, message: str) -> TaskError:
    """A :class:`TaskError` whose one line starts with the task name."""
    return TaskError(f"task {task}: {' '.join(message.split())}")


def as_int(task: str, settings: dict, key: str, minimum: int = 1) -> int:
    """``settings[key]`` as a Python int >= minimum (bools refused)."""
    value = settings[key]
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise fail(task, f"{key} must be an integer >= {minimum}, got {value!r}")
    value = int(value)
    if value < minimum:
        raise fail(task, f"{key} must be an integer >= {minimum}, got {value}")
    settings[key] = value
    return value


def as_float(task: str, settings: dict, key: str, low: float, high: float,
             high_inclusive: bool = False) -> float:
    """``settings[key]`` as a float in [low, high) (or [low, high])."""
    value = settings[key]
    bracket = "]" if high_inclusive else ")"
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise fail(task, f"{key} must be a number in [{low}, {high}{bracket}, got {value!r}")
    value = float(value)
    inside = low <= value <= high if high_inclusive else low <= value < high
    if not inside:
        raise fail(task, f"{key} must be in [{low}, {high}{bracket}, got {value}")
    settings[key] = value
    return value


def as_bool(task: str, settings: dict, key: str) -> bool:
    value = settings[key]
    if not isinstance(value, (bool, np.bool_)):
        raise fail(task, f"{key} must be true or false, got {value!r}")
    settings[key] = bool(value)
    return bool(value)


def check_sizes(task: str, settings: dict) -> None:
    """Example counts: positive ints; ``num_valid_examples`` None means num_test_examples."""
    as_int(task, settings, "num_train_examples")
    as_int(task, settings, "num_test_examples")
    if settings.get("num_valid_examples") is None:
        settings["num_valid_examples"] = settings["num_test_examples"]
    as_int(task, settings, "num_valid_examples")


def check_noise(task: str, settings: dict) -> tuple[int, float]:
    """``noise_vocab_size`` >= 0 and ``frac_noise`` in [0, 1); noise needs noise tokens."""
    noise_vocab = as_int(task, settings, "noise_vocab_size", minimum=0)
    frac = as_float(task, settings, "frac_noise", 0.0, 1.0)
    if frac > 0 and noise_vocab == 0:
        raise fail(task, f"frac_noise={frac} needs noise tokens: set noise_vocab_size >= 1")
    return noise_vocab, frac
