"""Two example tasks: token_reversal and token_sorting.

Vocabulary: content tokens ``[0, V - 1)``, separator ``V - 1``. With ``n = seq_len / 2``, an
example is ``n`` content tokens (uniform, with replacement), the separator, then the first
``n - 1`` tokens of the answer (teacher forcing), ``seq_len`` tokens in all. The answer is the
``n`` tokens reversed (``token_reversal``) or sorted ascending (``token_sorting``). Targets are
``-100`` over the first ``n`` positions, then the answer: after reading the separator and
``t`` answer tokens the model must output answer token ``t``. Training and evaluation examples
have the same form.

``token_reversal`` registers itself with ``@register`` (the module-form entry point
``token_reversal = "mad_search_example_blocks.tasks"`` imports this module);
``token_sorting`` is a plain factory that the object-form entry point
``token_sorting = "mad_search_example_blocks.tasks:token_sorting"`` registers under its name.
Neither imports ``datasets``: mad-search builds the Arrow tables from the arrays ``splits``
returns.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from mad_search.tasks import IGNORE_INDEX, Task, TaskInfo, register
from mad_search.tasks.splits import synthetic_splits
from mad_search.tasks.task import as_int, check_sizes, fail

# Settings and their defaults; conf/task/<name>.yaml repeats them for `task=<name>`.
DEFAULTS = {
    "vocab_size": 16,
    "seq_len": 32,
    "num_train_examples": 4_096,
    "num_test_examples": 512,
    "num_valid_examples": None,  # None: as many as num_test_examples
}


def _checker(name: str) -> Callable[[dict], dict]:
    def check(settings: dict) -> dict:
        check_sizes(name, settings)
        as_int(name, settings, "vocab_size", minimum=3)  # two content tokens and the separator
        seq_len = as_int(name, settings, "seq_len", minimum=2)
        if seq_len % 2:
            raise fail(name, f"seq_len must be even, got {seq_len}")
        return settings

    return check


def _sampler(arrange: Callable[[np.ndarray], np.ndarray]):
    """``sample(settings, count, training, rng, shared)`` for an answer ``arrange(tokens)``."""

    def sample(settings: dict, count: int, training: bool, rng: np.random.Generator,
               shared=None) -> tuple[np.ndarray, np.ndarray]:
        vocab, seq_len = settings["vocab_size"], settings["seq_len"]
        n = seq_len // 2
        tokens = rng.integers(0, vocab - 1, size=(count, n))
        answer = arrange(tokens)
        separator = np.full((count, 1), vocab - 1)
        inputs = np.concatenate([tokens, separator, answer[:, :-1]], axis=1)
        targets = np.concatenate([np.full((count, n), IGNORE_INDEX), answer], axis=1)
        return inputs, targets

    return sample


def _task(name: str, arrange: Callable[[np.ndarray], np.ndarray]) -> Task:
    sample = _sampler(arrange)
    return Task(
        name=name,
        defaults=DEFAULTS,
        check=_checker(name),
        info=lambda s: TaskInfo(vocab_size=s["vocab_size"], seq_len=s["seq_len"]),
        splits=lambda s, seed: synthetic_splits(name, s, seed, sample),
    )


@register("token_reversal")
def token_reversal() -> Task:
    """Read n tokens, write them back last first."""
    return _task("token_reversal", lambda tokens: tokens[:, ::-1])


def token_sorting() -> Task:
    """Read n tokens, write them back in ascending order (registered by its entry point)."""
    return _task("token_sorting", lambda tokens: np.sort(tokens, axis=1))
