"""Selective copying (mad-lab's definition).

Vocabulary: content tokens ``[0, V - 2)``, blank ``V - 2``, copy trigger ``V - 1``.

With ``n = num_tokens_to_copy`` and ``L = seq_len``: ``n`` content tokens (uniform, with
replacement) are scattered among ``L - 2n - 1`` blanks, then come the copy token and ``n``
blanks. Inputs have ``L`` tokens. Targets are ``-100`` up to and including the copy token, then
the ``n`` content tokens in order: after reading the copy token and ``t + 1`` blanks the model
must output the ``t``-th token. Training and evaluation examples have the same form.

As in mad-lab, each blank is inserted before one of the ``n`` tokens chosen uniformly (NumPy
``insert`` at an index in ``[0, n)``), so the last content token always sits right before the
copy token; we keep that layout.

Difference from mad-lab, deliberate: mad-lab draws the blank positions from NumPy's unseeded
global RNG (``np.random.randint``), so its data change from run to run whatever the seed; here
every draw comes from the task's seeded generator (the per-token blank counts are one
multinomial draw, the same distribution).
"""

from __future__ import annotations

import numpy as np

from mad_search.tasks.registry import register
from mad_search.tasks.splits import synthetic_splits
from mad_search.tasks.task import IGNORE_INDEX, Task, TaskInfo, as_int, check_sizes, fail

DEFAULTS = {
    "vocab_size": 16,
    "seq_len": 256,
    "num_tokens_to_copy": 16,
    "num_train_examples": 12_800,
    "num_test_examples": 1_280,
    "num_valid_examples": None,
}
NAME = "selective_copying"


def _check(settings: dict) -> dict:
    check_sizes(NAME, settings)
    as_int(NAME, settings, "vocab_size", minimum=3)
    n = as_int(NAME, settings, "num_tokens_to_copy")
    seq_len = as_int(NAME, settings, "seq_len", minimum=4)
    if seq_len <= 2 * n + 1:
        raise fail(NAME, f"num_tokens_to_copy={n} is too large for seq_len={seq_len}: need "
                         f"seq_len > 2*num_tokens_to_copy + 1, so at most {(seq_len - 2) // 2}")
    return settings


def sample(settings: dict, count: int, training: bool, rng: np.random.Generator,
           shared=None) -> tuple[np.ndarray, np.ndarray]:
    vocab, seq_len, n = settings["vocab_size"], settings["seq_len"], settings["num_tokens_to_copy"]
    blank, copy = vocab - 2, vocab - 1
    num_blanks = seq_len - 2 * n - 1
    to_copy = rng.integers(0, vocab - 2, (count, n))
    blanks_before = rng.multinomial(num_blanks, np.full(n, 1.0 / n), size=count)
    position = np.arange(n)[None, :] + np.cumsum(blanks_before, axis=1)

    inputs = np.full((count, seq_len), blank, np.int64)
    np.put_along_axis(inputs, position, to_copy, axis=1)
    inputs[:, n + num_blanks] = copy
    targets = np.full((count, seq_len), IGNORE_INDEX, np.int64)
    targets[:, seq_len - n:] = to_copy
    return inputs, targets


@register(NAME, order=40)
def selective_copying() -> Task:
    """Selective copying (mad-lab)."""
    return Task(
        name=NAME,
        defaults=DEFAULTS,
        check=_check,
        info=lambda s: TaskInfo(vocab_size=s["vocab_size"], seq_len=s["seq_len"]),
        splits=lambda s, seed: synthetic_splits(NAME, s, seed, sample),
    )
