"""Multi-query associative recall (zoology's ``multiquery_ar``).

Vocabulary ``V``: keys ``[1, V // 2)``, values ``[V // 2, V)``; 0 is the filler.

Each example (``L = seq_len``, ``k = num_kv_pairs``): ``k`` distinct keys and ``k`` distinct
values (sampled without replacement per example) laid out as ``k1 v1 k2 v2 ...`` in the first
``2k`` positions; then every key is queried once, the j-th key at position ``2k + 2 g_j`` where
the gaps ``g_j`` are drawn without replacement from ``[0, (L - 2k) / 2)`` with
``p(g) ∝ a (g + 1)^(a - 1)`` (``a = power_a``, 0.01: short gaps are likelier). The target at a
query is its key's value; every other target is ``-100``. Other positions hold uniform random
tokens from ``[0, V)`` (``random_non_queries``, zoology's default) or 0. Training and
evaluation examples have the same form. Zoology's requirements hold: ``L`` even,
``V > L`` and ``4k <= L``.

Difference from zoology, deliberate: zoology draws the filler tokens from torch's global RNG
(not its seed) and the test set from ``seed + 10``; here every draw comes from the task's seeded
streams, and test inputs never repeat a training input.
"""

from __future__ import annotations

import numpy as np

from mad_search.tasks.registry import register
from mad_search.tasks.splits import synthetic_splits
from mad_search.tasks.task import (
    IGNORE_INDEX,
    Task,
    TaskInfo,
    as_bool,
    as_float,
    as_int,
    check_sizes,
    fail,
)

DEFAULTS = {
    "vocab_size": 8_192,
    "seq_len": 64,
    "num_kv_pairs": 8,
    "num_train_examples": 100_000,
    "num_test_examples": 3_000,
    "num_valid_examples": None,
    "power_a": 0.01,
    "random_non_queries": True,
}
NAME = "mqar"


def _check(settings: dict) -> dict:
    check_sizes(NAME, settings)
    as_bool(NAME, settings, "random_non_queries")
    as_float(NAME, settings, "power_a", 1e-9, 1.0, high_inclusive=True)
    pairs = as_int(NAME, settings, "num_kv_pairs")
    seq_len = as_int(NAME, settings, "seq_len", minimum=4)
    vocab = as_int(NAME, settings, "vocab_size", minimum=2)
    if seq_len % 2:
        raise fail(NAME, f"seq_len must be even, got {seq_len}")
    if 4 * pairs > seq_len:
        raise fail(NAME, f"num_kv_pairs={pairs} needs seq_len >= 4*num_kv_pairs = {4 * pairs} "
                         f"(got seq_len={seq_len}); use num_kv_pairs <= {seq_len // 4}")
    if vocab <= seq_len:
        raise fail(NAME, f"vocab_size={vocab} must be greater than seq_len={seq_len}")
    return settings


def choose_distinct(rng: np.random.Generator, n: int, low: int, high: int,
                    k: int) -> np.ndarray:
    """``(n, k)`` draws from [low, high) without replacement per row, in random order."""
    span = high - low
    if k * (k - 1) <= 2 * span:  # few collisions expected: redraw the rows that have one
        out = rng.integers(low, high, (n, k))
        while True:
            s = np.sort(out, axis=1)
            bad = (s[:, 1:] == s[:, :-1]).any(axis=1)
            if not bad.any():
                return out
            out[bad] = rng.integers(low, high, (int(bad.sum()), k))
    block = max(1, 2_000_000 // span)  # a random permutation per row, in bounded memory
    return np.concatenate([np.argsort(rng.random((min(block, n - i), span)), axis=1)[:, :k]
                           for i in range(0, n, block)]) + low


def sample(settings: dict, count: int, training: bool, rng: np.random.Generator,
           shared=None) -> tuple[np.ndarray, np.ndarray]:
    vocab, seq_len, k = settings["vocab_size"], settings["seq_len"], settings["num_kv_pairs"]
    a = settings["power_a"]
    context = 2 * k
    space = (seq_len - context) // 2
    rows = np.arange(count)[:, None]

    keys = choose_distinct(rng, count, 1, vocab // 2, k)
    values = choose_distinct(rng, count, vocab // 2, vocab, k)
    # gaps without replacement under the power law, in draw order (Gumbel top-k)
    log_p = np.log(a * np.arange(1, space + 1, dtype=np.float64) ** (a - 1))
    gaps = np.argsort(-(log_p + rng.gumbel(size=(count, space))), axis=1)[:, :k]
    query_at = context + 2 * gaps

    if settings["random_non_queries"]:
        inputs = rng.integers(0, vocab, (count, seq_len))
    else:
        inputs = np.zeros((count, seq_len), np.int64)
    inputs[:, 0:context:2] = keys
    inputs[:, 1:context:2] = values
    inputs[rows, query_at] = keys
    targets = np.full((count, seq_len), IGNORE_INDEX, np.int64)
    targets[rows, query_at] = values
    return inputs, targets


@register(NAME, order=70)
def mqar() -> Task:
    """Multi-query associative recall (zoology)."""
    return Task(
        name=NAME,
        defaults=DEFAULTS,
        check=_check,
        info=lambda s: TaskInfo(vocab_size=s["vocab_size"], seq_len=s["seq_len"]),
        splits=lambda s, seed: synthetic_splits(NAME, s, seed, sample),
    )
