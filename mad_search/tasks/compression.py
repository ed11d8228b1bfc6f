"""Compression (mad-lab's definition), the one encoder-decoder task.

Vocabulary: content tokens ``[0, C)`` with ``C = V - 1 - noise_vocab_size``, noise tokens
``[C, V - 1)``, compression token ``V - 1``.

Inputs: ``seq_len - 1`` content tokens (uniform, with replacement) then the compression token.
The model reads the whole input, pools it into one vector (the compression token's), and
decodes every position from that vector. Targets are the clean input sequence, compression
token included. With ``frac_noise > 0`` each content position is, with that probability,
replaced in the input by a uniform noise token and its target set to ``-100``. Training and
evaluation examples have the same form.

Difference from mad-lab, deliberate: mad-lab builds that noise mask and then returns
``(inputs, inputs)``, so it scores the noise tokens themselves; we return the masked targets
(the replaced token cannot be recovered from the input, so it is not scored). Its baseline and
grid use no noise, where the two agree.
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
    "vocab_size": 16,
    "seq_len": 32,
    "num_train_examples": 12_800,
    "num_test_examples": 1_280,
    "num_valid_examples": None,
    "frac_noise": 0.0,
    "noise_vocab_size": 0,
}
NAME = "compression"


def _check(settings: dict) -> dict:
    check_sizes(NAME, settings)
    noise_vocab, _ = check_noise(NAME, settings)
    as_int(NAME, settings, "seq_len", minimum=2)
    vocab = as_int(NAME, settings, "vocab_size", minimum=2)
    if vocab - 1 - noise_vocab < 1:
        raise fail(NAME, f"vocab_size={vocab} leaves no content token after {noise_vocab} noise "
                         f"tokens and the compression token: need vocab_size >= {noise_vocab + 2}")
    return settings


def sample(settings: dict, count: int, training: bool, rng: np.random.Generator,
           shared=None) -> tuple[np.ndarray, np.ndarray]:
    vocab, seq_len = settings["vocab_size"], settings["seq_len"]
    content = vocab - 1 - settings["noise_vocab_size"]
    clean = np.empty((count, seq_len), np.int64)
    clean[:, :-1] = rng.integers(0, content, (count, seq_len - 1))
    clean[:, -1] = vocab - 1
    inputs, targets = clean, clean.copy()
    if settings["frac_noise"] > 0:
        noisy = np.zeros((count, seq_len), bool)
        noisy[:, :-1] = rng.random((count, seq_len - 1)) < settings["frac_noise"]
        noise = rng.integers(content, vocab - 1, (count, seq_len))
        inputs = np.where(noisy, noise, clean)
        targets[noisy] = IGNORE_INDEX
    return inputs, targets


@register(NAME, order=50)
def compression() -> Task:
    """Compression (mad-lab): an encoder-decoder reconstructs the clean input."""
    return Task(
        name=NAME,
        defaults=DEFAULTS,
        check=_check,
        info=lambda s: TaskInfo(vocab_size=s["vocab_size"], seq_len=s["seq_len"],
                                encoder_decoder=True),
        splits=lambda s, seed: synthetic_splits(NAME, s, seed, sample),
    )
