"""Memorization (mad-lab's definition): one fixed key->value map, learned across examples.

Vocabulary: content ``C = V - 1 - noise_vocab_size`` tokens, keys ``[0, C // 2)``, values
``[C // 2, C)``, noise ``[C, V - 1)``, insert token ``V - 1``. The map sends each key to a
distinct value (a random injection, as mad-lab's shuffled key and value lists zipped); it is
drawn once from the seed and shared by every split.

Inputs: ``seq_len / 2`` slots ``key insert`` (keys uniform, with replacement), or with
probability ``frac_noise`` two noise tokens (one random slot is always a key). Targets: the
key's value at the insert token, ``-100`` elsewhere. Values never appear in the inputs, so the
only way to score is to have memorised the map in the weights. Training and evaluation
examples have the same form.

Splits, as in mad-lab: test (and validation) examples are fresh random key sequences under the
same map, so what is held out is the sequences, never the pairs: the test measures how much of
the map the model has stored. We keep every test and validation input sequence distinct from
the training ones. With mad-lab's grid (256 training sequences of 16 keys) every key is
trained at vocab 256, but at vocab 8192 about e^-1 = 37% of the 4095 keys never occur in
training, which caps test accuracy there (that is the difficulty the grid measures).

Difference from mad-lab, deliberate: with noise, mad-lab builds the map over ``V - 1`` tokens
while its noise tokens start at ``V - 1 - noise_vocab_size``, so noise overlaps the values; here
the map is built over the ``C`` content tokens. (Its grid uses no noise.)
"""

from __future__ import annotations

import numpy as np

from mad_search.tasks.registry import register
from mad_search.tasks.splits import synthetic_splits
from mad_search.tasks.task import (
    IGNORE_INDEX,
    Task,
    TaskInfo,
    as_int,
    check_noise,
    check_sizes,
    fail,
)

DEFAULTS = {
    "vocab_size": 256,
    "seq_len": 32,
    "num_train_examples": 256,
    "num_test_examples": 1_280,
    "num_valid_examples": None,
    "frac_noise": 0.0,
    "noise_vocab_size": 0,
}
NAME = "memorization"


def _check(settings: dict) -> dict:
    check_sizes(NAME, settings)
    noise_vocab, _ = check_noise(NAME, settings)
    seq_len = as_int(NAME, settings, "seq_len", minimum=2)
    if seq_len % 2:
        raise fail(NAME, f"seq_len must be even (key, insert-token slots), got {seq_len}")
    vocab = as_int(NAME, settings, "vocab_size", minimum=3)
    if (vocab - 1 - noise_vocab) // 2 < 1:
        raise fail(NAME, f"vocab_size={vocab} leaves no key and value after {noise_vocab} "
                         f"noise tokens and the insert token: need vocab_size >= "
                         f"{noise_vocab + 3}")
    return settings


def key_value_map(settings: dict, rng: np.random.Generator) -> np.ndarray:
    """``value_of[key]`` for every key: distinct values, uniformly random."""
    content = settings["vocab_size"] - 1 - settings["noise_vocab_size"]
    num_keys = content // 2
    return rng.permutation(np.arange(num_keys, content))[:num_keys]


def sample(settings: dict, count: int, training: bool, rng: np.random.Generator,
           value_of: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    vocab, frac = settings["vocab_size"], settings["frac_noise"]
    content = vocab - 1 - settings["noise_vocab_size"]
    slots = settings["seq_len"] // 2
    keys = rng.integers(0, len(value_of), (count, slots))
    inputs = np.empty((count, 2 * slots), np.int64)
    targets = np.full((count, 2 * slots), IGNORE_INDEX, np.int64)
    inputs[:, 0::2] = keys
    inputs[:, 1::2] = vocab - 1
    targets[:, 1::2] = value_of[keys]
    if frac > 0:
        noise = rng.random((count, slots)) < frac
        noise[np.arange(count), rng.integers(0, slots, count)] = False
        noise_tokens = rng.integers(content, vocab - 1, (count, slots, 2))
        inputs[:, 0::2][noise] = noise_tokens[..., 0][noise]
        inputs[:, 1::2][noise] = noise_tokens[..., 1][noise]
        targets[:, 1::2][noise] = IGNORE_INDEX
    return inputs, targets


@register(NAME, order=60)
def memorization() -> Task:
    """Memorization (mad-lab): one fixed key->value map."""
    return Task(
        name=NAME,
        defaults=DEFAULTS,
        check=_check,
        info=lambda s: TaskInfo(vocab_size=s["vocab_size"], seq_len=s["seq_len"]),
        splits=lambda s, seed: synthetic_splits(NAME, s, seed, sample, prepare=key_value_map),
    )
