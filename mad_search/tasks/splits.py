"""Train / validation / test splits for the synthetic tasks, and their Arrow form.

Randomness: one ``numpy.random.SeedSequence(seed)`` spawns four independent streams, used for
(0) state shared by all splits (memorization's key->value map), (1) train, (2) test and
(3) validation. So the test set does not depend on ``num_train_examples`` (except through
de-duplication), and the same seed gives the same data in any process.

Disjointness: a test row whose input sequence equals a train row's is dropped and redrawn, and
likewise for validation against train and test, so no input sequence is in two splits. Where the
task has too few distinct sequences for that, :class:`TaskError` says so.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import numpy as np

from mad_search.tasks.task import Arrays, fail

if TYPE_CHECKING:
    import pyarrow as pa

# A sampler draws n examples: sample(settings, n, training, rng, shared) -> (inputs, targets).
Sampler = Callable[[dict, int, bool, np.random.Generator, Any], Arrays]

CHUNK_ELEMENTS = 2_000_000  # work per generator call (rows x row_cost), bounds peak memory
MAX_REDRAW_ROUNDS = 50


def synthetic_splits(
    task: str,
    settings: dict,
    seed: int,
    sample: Sampler,
    prepare: Callable[[dict, np.random.Generator], Any] | None = None,
    row_cost: int | None = None,
) -> dict[str, Arrays]:
    """Draw train (training format), test and validation (evaluation format) examples."""
    shared_ss, train_ss, test_ss, valid_ss = np.random.SeedSequence(seed).spawn(4)
    shared = prepare(settings, np.random.default_rng(shared_ss)) if prepare else None
    chunk = max(1, CHUNK_ELEMENTS // max(1, row_cost or settings["seq_len"]))

    def draw(n: int, training: bool, rng: np.random.Generator) -> Arrays:
        parts = [sample(settings, min(chunk, n - start), training, rng, shared)
                 for start in range(0, n, chunk)]
        return (np.concatenate([p[0] for p in parts]).astype(np.int32, copy=False),
                np.concatenate([p[1] for p in parts]).astype(np.int32, copy=False))

    train = draw(settings["num_train_examples"], True, np.random.default_rng(train_ss))
    seen = row_set(train[0])
    test = _draw_disjoint(task, "test", settings["num_test_examples"],
                          np.random.default_rng(test_ss), draw, seen)
    seen |= row_set(test[0])
    valid = _draw_disjoint(task, "validation", settings["num_valid_examples"],
                           np.random.default_rng(valid_ss), draw, seen)
    return {"train": train, "validation": valid, "test": test}


def row_set(inputs: np.ndarray) -> set[bytes]:
    """The rows of a 2-D int array as a set of byte strings (for exact-duplicate checks)."""
    rows = np.ascontiguousarray(inputs, dtype=np.int32)
    return {row.tobytes() for row in rows}


def _draw_disjoint(task: str, split: str, n: int, rng: np.random.Generator,
                   draw: Callable[[int, bool, np.random.Generator], Arrays],
                   exclude: set[bytes]) -> Arrays:
    """Draw n evaluation-format rows none of whose inputs is in ``exclude``."""
    xs: list[np.ndarray] = []
    ys: list[np.ndarray] = []
    have, want = 0, n
    for _ in range(MAX_REDRAW_ROUNDS):
        x, y = draw(want, False, rng)
        keep = np.fromiter((row.tobytes() not in exclude for row in x), bool, len(x))
        xs.append(x[keep])
        ys.append(y[keep])
        have += int(keep.sum())
        if have >= n:
            return np.concatenate(xs)[:n], np.concatenate(ys)[:n]
        want = max(2 * (n - have), 64)
    raise fail(task, f"cannot draw {n} {split} examples whose inputs differ from the other "
                     "splits: the task has too few distinct sequences; raise vocab_size or "
                     "seq_len, or lower num_train_examples")


def to_table(inputs: np.ndarray, targets: np.ndarray) -> pa.Table:
    """Two fixed-length int32 list columns, built from flat buffers (no Python lists)."""
    import pyarrow as pa

    n, length = inputs.shape

    def column(a: np.ndarray) -> pa.Array:
        flat = pa.array(np.ascontiguousarray(a, dtype=np.int32).reshape(-1))
        return pa.FixedSizeListArray.from_arrays(flat, length) if n else pa.array(
            [], pa.list_(pa.int32(), length))

    return pa.table({"inputs": column(inputs), "targets": column(targets)})
