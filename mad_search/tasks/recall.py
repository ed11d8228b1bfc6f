"""In-context recall, noisy in-context recall, fuzzy in-context recall (mad-lab's definitions).

Vocabulary (``V = vocab_size``, ``N = noise_vocab_size``). Plain and noisy recall: ``C = V - N``
content tokens (``V - N - 1`` with ``multi_query: false``, which reserves ``V - 1`` as a copy
prefix); keys are ``[0, C // 2)``, values ``[C // 2, C)``, noise tokens ``[C, C + N)``. Fuzzy
recall also reserves a pad token: ``C = V - N - 1`` (``- 2`` single-query), pad ``= C + N``.

in_context_recall / noisy_in_context_recall (``seq_len = L``, even)
    ``L/2 - 1`` slots, each a key-value pair ``k v`` (a key keeps one value for the whole
    sequence, drawn uniformly at its first appearance) or, with probability ``frac_noise``, two
    noise tokens; one random slot is always a pair. Then a final probe ``k v`` with ``k``
    uniform over the keys shown. Inputs are the first ``L - 1`` tokens (single-query:
    ``... copy k v``, ``L`` tokens). Training targets are the whole input shifted by one (mad-lab
    trains on every next token); evaluation targets are, at each key position, the value of a
    key already seen (multi-query) and the probe's value; ``-100`` elsewhere.

fuzzy_in_context_recall
    Keys are 1..``k_motif_size`` distinct key tokens, values 1..``v_motif_size`` distinct value
    tokens (sizes uniform, tuples uniform). Pairs (or noise runs of the same length) are added
    while the sequence is shorter than ``L - |probe| - (k_motif_size + v_motif_size)``; the
    probe pair is placed at a random point; the probe is repeated at the end; the sequence is
    left-padded with the pad token to ``L + 1`` and shifted, so inputs have ``L`` tokens.
    Evaluation sequences use keys of exactly ``k_motif_size`` tokens. Targets as above, one
    value token per position.

Differences from mad-lab, all deliberate:
  * Generation is vectorised with NumPy, so a seed gives mad-lab's distribution, not its exact
    sequences.
  * Plain recall: mad-lab's "at least one pair" slot can fall outside the loop (then a sequence
    of pure noise crashes its probe draw); here the forced pair slot is always inside.
  * Fuzzy recall: mad-lab can finish a sequence before its probe pair was ever shown (when the
    random probe position falls past the last slot: about 2% of sequences at the baseline), so the
    final target is unanswerable; here the probe then takes the last slot, so it is always shown.
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
    as_int,
    check_noise,
    check_sizes,
    fail,
)

RECALL_DEFAULTS = {
    "vocab_size": 16,
    "seq_len": 128,
    "num_train_examples": 12_800,
    "num_test_examples": 1_280,
    "num_valid_examples": None,
    "multi_query": True,
    "frac_noise": 0.0,
    "noise_vocab_size": 0,
}
NOISY_DEFAULTS = {**RECALL_DEFAULTS, "vocab_size": 32, "frac_noise": 0.2, "noise_vocab_size": 16}
FUZZY_DEFAULTS = {**RECALL_DEFAULTS, "k_motif_size": 3, "v_motif_size": 3}


def _layout(settings: dict, fuzzy: bool) -> dict:
    """Token ranges: keys [0, nk), values [nk, content), noise [content, content + N)."""
    vocab, noise = settings["vocab_size"], settings["noise_vocab_size"]
    specials = int(fuzzy) + int(not settings["multi_query"])
    content = vocab - specials - noise
    return {"nk": content // 2, "content": content, "noise": noise,
            "pad": content + noise, "copy": vocab - 1}


def _check_vocab(name: str, settings: dict, fuzzy: bool, k_motif: int = 1, v_motif: int = 1):
    lay = _layout(settings, fuzzy)
    need_keys, need_values = k_motif, v_motif
    nk, nv = lay["nk"], lay["content"] - lay["nk"]
    if nk < need_keys or nv < need_values:
        specials = int(fuzzy) + int(not settings["multi_query"])
        minimum = max(2 * need_keys, need_keys + need_values) + lay["noise"] + specials
        what = "keys+values" + (" (motifs need distinct tokens)" if fuzzy else "")
        raise fail(name, f"vocab_size={settings['vocab_size']} leaves {nk} key and {nv} value "
                         f"tokens after {lay['noise']} noise and {specials} special tokens; "
                         f"{what} need vocab_size >= {minimum}")


def _check_recall(name: str):
    def check(settings: dict) -> dict:
        check_sizes(name, settings)
        as_bool(name, settings, "multi_query")
        check_noise(name, settings)
        seq_len = as_int(name, settings, "seq_len", minimum=4)
        if seq_len % 2:
            raise fail(name, f"seq_len must be even (key-value pairs), got {seq_len}")
        as_int(name, settings, "vocab_size", minimum=2)
        _check_vocab(name, settings, fuzzy=False)
        return settings
    return check


def _check_fuzzy(settings: dict) -> dict:
    name = "fuzzy_in_context_recall"
    check_sizes(name, settings)
    as_bool(name, settings, "multi_query")
    check_noise(name, settings)
    k_motif = as_int(name, settings, "k_motif_size")
    v_motif = as_int(name, settings, "v_motif_size")
    seq_len = as_int(name, settings, "seq_len", minimum=1)
    width = k_motif + v_motif
    if seq_len <= 2 * width:
        raise fail(name, f"seq_len={seq_len} is too short for k_motif_size={k_motif} and "
                         f"v_motif_size={v_motif}: need seq_len > {2 * width}")
    as_int(name, settings, "vocab_size", minimum=3)
    _check_vocab(name, settings, fuzzy=True, k_motif=k_motif, v_motif=v_motif)
    if (_layout(settings, fuzzy=True)["nk"] + 1) ** k_motif >= 2**62:
        raise fail(name, f"k_motif_size={k_motif} is too large for vocab_size="
                         f"{settings['vocab_size']}: key motifs must fit a 62-bit code")
    return settings


def _recall_info(settings: dict) -> TaskInfo:
    length = settings["seq_len"] - (1 if settings["multi_query"] else 0)
    return TaskInfo(vocab_size=settings["vocab_size"], seq_len=length)


def _fuzzy_info(settings: dict) -> TaskInfo:
    return TaskInfo(vocab_size=settings["vocab_size"], seq_len=settings["seq_len"])


# ---- in-context recall (plain and noisy) ----------------------------------------------------


def sample_recall(settings: dict, n: int, training: bool, rng: np.random.Generator,
                  shared=None) -> tuple[np.ndarray, np.ndarray]:
    lay = _layout(settings, fuzzy=False)
    nk, content, n_noise = lay["nk"], lay["content"], lay["noise"]
    multi_query, frac = settings["multi_query"], settings["frac_noise"]
    slots = settings["seq_len"] // 2 - 1
    rows = np.arange(n)

    keys = rng.integers(0, nk, (n, slots))
    value_of = rng.integers(nk, content, (n, nk))  # each key's value in this sequence
    values = np.take_along_axis(value_of, keys, axis=1)
    noise = np.zeros((n, slots), bool)
    if frac > 0:
        noise = rng.random((n, slots)) < frac
        noise[rows, rng.integers(0, slots, n)] = False  # at least one pair
        noise_tokens = rng.integers(content, content + n_noise, (n, slots, 2))

    # seen_before[i, s]: slot s's key was shown in an earlier pair slot of sequence i
    seen = np.zeros((n, nk), bool)
    seen_before = np.zeros((n, slots), bool)
    for s in range(slots):
        seen_before[:, s] = seen[rows, keys[:, s]]
        seen[rows, keys[:, s]] |= ~noise[:, s]

    # probe: uniform over the distinct keys shown
    probe_key = np.where(seen, rng.random((n, nk)), -1.0).argmax(axis=1)
    probe_value = value_of[rows, probe_key]

    extra = 0 if multi_query else 1
    tokens = np.empty((n, 2 * slots + 2 + extra), np.int64)
    tokens[:, 0:2 * slots:2] = keys
    tokens[:, 1:2 * slots:2] = values
    if frac > 0:
        tokens[:, 0:2 * slots:2][noise] = noise_tokens[..., 0][noise]
        tokens[:, 1:2 * slots:2][noise] = noise_tokens[..., 1][noise]
    if not multi_query:
        tokens[:, 2 * slots] = lay["copy"]
    tokens[:, -2] = probe_key
    tokens[:, -1] = probe_value
    if training:
        return tokens[:, :-1], tokens[:, 1:]

    targets = np.full_like(tokens, IGNORE_INDEX)
    if multi_query:
        targets[:, 1:2 * slots:2] = np.where(seen_before & ~noise, values, IGNORE_INDEX)
    targets[:, -1] = probe_value
    return tokens[:, :-1], targets[:, 1:]


# ---- fuzzy in-context recall ----------------------------------------------------------------


def distinct_tokens(rng: np.random.Generator, shape: tuple, low: int, count: int,
                    k: int) -> np.ndarray:
    """``shape + (k,)`` tokens from [low, low + count), distinct along the last axis.

    Any prefix of length j is a uniformly random j-permutation (so one draw serves every motif
    size up to k). Draw the j-th token's rank among the unused ones, then step over used ones
    in increasing order.
    """
    out = np.empty(shape + (k,), np.int32)
    for j in range(k):
        r = rng.integers(0, count - j, shape, dtype=np.int32)
        used = np.sort(out[..., :j], axis=-1) if j > 1 else out[..., :j]
        for t in range(j):
            r += r >= used[..., t]
        out[..., j] = r
    return out + np.int32(low)


def _first_occurrence(codes: np.ndarray) -> np.ndarray:
    """For each (row, slot): the first slot in that row with the same (non-negative) code."""
    n, slots = codes.shape
    flat = codes.reshape(-1)
    row = np.repeat(np.arange(n), slots)
    top = int(flat.max()) + 1
    if top * n < 2**62:  # one stable sort on (row, code); ties keep slot order
        order = np.argsort(row * top + flat, kind="stable")
    else:
        order = np.lexsort((np.arange(flat.size), flat, row))
    new_group = np.ones(flat.size, bool)
    new_group[1:] = (row[order][1:] != row[order][:-1]) | (flat[order][1:] != flat[order][:-1])
    group_start = np.maximum.accumulate(np.where(new_group, np.arange(flat.size), 0))
    first = np.empty(flat.size, np.int64)
    first[order] = order[group_start]
    return (first % slots).reshape(n, slots)


def _motif_code(tokens: np.ndarray, size: np.ndarray, base: int) -> np.ndarray:
    """An integer naming a motif (its first ``size`` tokens), distinct across sizes."""
    k = tokens.shape[-1]
    code = np.zeros(tokens.shape[:-1], np.int64)
    for j in range(k - 1, -1, -1):
        digit = np.where(j < size, tokens[..., j] + 1, 0)
        code = code * (base + 1) + digit
    return code


def sample_fuzzy(settings: dict, n: int, training: bool, rng: np.random.Generator,
                 shared=None) -> tuple[np.ndarray, np.ndarray]:
    lay = _layout(settings, fuzzy=True)
    nk, content = lay["nk"], lay["content"]
    nv = content - nk
    k_max, v_max = settings["k_motif_size"], settings["v_motif_size"]
    width = k_max + v_max
    seq_len, frac, multi_query = settings["seq_len"], settings["frac_noise"], settings[
        "multi_query"]
    rows = np.arange(n)

    # the probe pair
    probe_k_size = rng.integers(1, k_max + 1, n) if training else np.full(n, k_max)
    probe_v_size = rng.integers(1, v_max + 1, n)
    probe_k = distinct_tokens(rng, (n,), 0, nk, k_max)
    probe_v = distinct_tokens(rng, (n,), nk, nv, v_max)
    probe_len = probe_k_size + probe_v_size
    probe_at = rng.integers(0, seq_len - 2 * probe_len)  # token position to place it from
    limit = seq_len - probe_len - width  # add slots while the sequence is shorter than this

    # the slots: sizes, key and value motifs (a prefix of each is used), noise. Draw as many
    # slots as could ever fit, then keep as many as the fullest sequence of this batch might
    # use: each slot has its key and >= 1 value token, and the probe taking a slot can free up
    # to k_max - 1 tokens.
    slots = (seq_len - width) // 2 + 1
    if training:
        k_size = rng.integers(1, k_max + 1, (n, slots), dtype=np.int32)
    else:
        k_size = np.full((n, slots), k_max, np.int32)
    v_size = rng.integers(1, v_max + 1, (n, slots), dtype=np.int32)
    shortest = k_size + 1
    fits = ((np.cumsum(shortest, axis=1) - shortest) < limit[:, None]).sum(axis=1).max()
    slots = min(slots, int(fits) + k_max)
    k_size, v_size = k_size[:, :slots], v_size[:, :slots]
    key_tok = distinct_tokens(rng, (n, slots), 0, nk, k_max)
    val_tok = distinct_tokens(rng, (n, slots), nk, nv, v_max)
    noise = np.zeros((n, slots), bool)
    if frac > 0:
        noise = rng.random((n, slots)) < frac
        noise_tok = rng.integers(content, content + lay["noise"], (n, slots, width))
    code = _motif_code(key_tok, k_size, nk)
    probe_code = _motif_code(probe_k, probe_k_size, nk)

    is_probe = ~noise & (code == probe_code[:, None])

    def bind_values():
        """A key keeps the value of its first appearance; the probe key has the probe value."""
        first = _first_occurrence(np.where(noise, np.arange(slots)[None, :], code + slots))
        size = np.take_along_axis(v_size, first, axis=1)
        size = np.where(is_probe, probe_v_size[:, None], size)
        starts = np.cumsum(k_size + size, axis=1) - (k_size + size)
        return first, size, starts

    # where the probe pair goes: the first slot starting at or after probe_at (mad-lab), or
    # the last slot if the sequence would end first; unless the probe key already came up
    _, _, start = bind_values()
    last = (start < limit[:, None]).sum(axis=1) - 1
    crosses = start >= probe_at[:, None]
    at = np.minimum(np.where(crosses.any(axis=1), crosses.argmax(axis=1), slots), last)
    before = is_probe & (np.arange(slots)[None, :] < at[:, None])
    insert = ~before.any(axis=1)
    r, j = rows[insert], at[insert]
    k_size[r, j] = probe_k_size[insert]
    key_tok[r, j] = probe_k[insert]
    code[r, j] = probe_code[insert]
    noise[r, j] = False
    is_probe[r, j] = True

    # bind again: slots after the probe may have lost the first appearance of their key
    first, v_size, start = bind_values()
    val_tok = np.take_along_axis(val_tok, first[..., None], axis=1)
    val_tok = np.where(is_probe[..., None], probe_v[:, None, :], val_tok)
    repeat = ~noise & (first != np.arange(slots)[None, :])
    length = k_size + v_size
    kept = start < limit[:, None]

    # slot tokens laid out on a (n, slots, width) grid, then compacted
    pos = np.arange(width)
    k_part = np.zeros((n, slots, width), np.int32)
    k_part[..., :k_max] = key_tok
    v_index = np.clip(pos[None, None, :] - k_size[..., None], 0, v_max - 1)
    v_part = np.take_along_axis(val_tok, v_index, axis=2)
    in_key = pos[None, None, :] < k_size[..., None]
    grid = np.where(in_key, k_part, v_part)
    if frac > 0:
        grid = np.where(noise[..., None], noise_tok, grid)
    if not training:
        scored = (repeat & multi_query)[..., None] & ~in_key
        grid_target = np.where(scored, grid, IGNORE_INDEX)
    grid_valid = (pos[None, None, :] < length[..., None]) & kept[..., None]

    # the final probe: [copy] key value
    tail_width = 1 + width
    tpos = np.arange(tail_width)
    head = 0 if multi_query else 1
    t_key = np.pad(probe_k, ((0, 0), (head, tail_width - head - k_max)))
    t_val_index = np.clip(tpos[None, :] - head - probe_k_size[:, None], 0, v_max - 1)
    t_val = np.take_along_axis(probe_v, t_val_index, axis=1)
    in_tail_key = tpos[None, :] < head + probe_k_size[:, None]
    tail = np.where(in_tail_key, t_key, t_val)
    if not multi_query:
        tail[:, 0] = lay["copy"]
    tail_target = np.where(in_tail_key, IGNORE_INDEX, tail)
    tail_valid = tpos[None, :] < head + probe_len[:, None]

    tokens = np.concatenate([grid.reshape(n, -1), tail], axis=1)
    valid = np.concatenate([grid_valid.reshape(n, -1), tail_valid], axis=1)

    # right-align every sequence in seq_len + 1 tokens, left-padded
    total = seq_len + 1
    i, j = np.nonzero(valid)
    dest = (total - valid.sum(axis=1))[i] + np.cumsum(valid, axis=1, dtype=np.int32)[i, j] - 1
    out = np.full((n, total), lay["pad"], np.int32)
    out[i, dest] = tokens[i, j]
    if training:
        return out[:, :-1], out[:, 1:]
    targets = np.concatenate([grid_target.reshape(n, -1), tail_target], axis=1)
    out_target = np.full((n, total), IGNORE_INDEX, np.int32)
    out_target[i, dest] = targets[i, j]
    return out[:, :-1], out_target[:, 1:]


def _fuzzy_cost(settings: dict) -> int:
    return settings["seq_len"] * (settings["k_motif_size"] + settings["v_motif_size"] + 4)


@register("in_context_recall", order=10)
def in_context_recall() -> Task:
    """In-context recall (mad-lab)."""
    return Task(
        name="in_context_recall",
        defaults=RECALL_DEFAULTS,
        check=_check_recall("in_context_recall"),
        info=_recall_info,
        splits=lambda s, seed: synthetic_splits("in_context_recall", s, seed, sample_recall),
    )


@register("fuzzy_in_context_recall", order=20)
def fuzzy_in_context_recall() -> Task:
    """Fuzzy in-context recall (mad-lab): keys and values are motifs of several tokens."""
    return Task(
        name="fuzzy_in_context_recall",
        defaults=FUZZY_DEFAULTS,
        check=_check_fuzzy,
        info=_fuzzy_info,
        splits=lambda s, seed: synthetic_splits("fuzzy_in_context_recall", s, seed, sample_fuzzy,
                                                row_cost=_fuzzy_cost(s)),
    )


@register("noisy_in_context_recall", order=30)
def noisy_in_context_recall() -> Task:
    """Noisy in-context recall (mad-lab): noise tokens between the pairs."""
    return Task(
        name="noisy_in_context_recall",
        defaults=NOISY_DEFAULTS,
        check=_check_recall("noisy_in_context_recall"),
        info=_recall_info,
        splits=lambda s, seed: synthetic_splits("noisy_in_context_recall", s, seed,
                                                sample_recall),
    )
