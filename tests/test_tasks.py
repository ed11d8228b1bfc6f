"""Tasks: every generator against its definition (parsed independently here), splits, cache,
settings errors, the difficulty grid, the YAML defaults, and the accuracy metric.

Properties that must hold for any seed draw a fresh seed per run (printed on failure).
"""

from __future__ import annotations

import hashlib
import importlib
import os
import random
import subprocess
import sys
import textwrap
from importlib.metadata import EntryPoint
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from mad_search import plugins, tasks
from mad_search.tasks import Task, TaskError, TaskInfo
from mad_search.tasks import registry as task_registry
from mad_search.tasks.splits import synthetic_splits
from mad_search.tasks.task import IGNORE_INDEX, check_sizes

ROOT = Path(__file__).resolve().parents[1]
IGNORE = -100
BUILT_IN = [
    "in_context_recall", "fuzzy_in_context_recall", "noisy_in_context_recall",
    "selective_copying", "compression", "memorization", "mqar", "text",
]


def fresh_seed() -> int:
    return random.randrange(10**6)


def arrays(data) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    return {split: (x.numpy(), y.numpy()) for split, (x, y) in tasks.as_tensors(data).items()}


def small(name: str, **settings) -> dict:
    """Small settings that build in a fraction of a second."""
    base = {
        "in_context_recall": dict(vocab_size=16, seq_len=64),
        "fuzzy_in_context_recall": dict(vocab_size=16, seq_len=64),
        "noisy_in_context_recall": dict(vocab_size=32, seq_len=64, frac_noise=0.4),
        "selective_copying": dict(vocab_size=16, seq_len=64, num_tokens_to_copy=8),
        "compression": dict(vocab_size=16, seq_len=16),
        "memorization": dict(vocab_size=64, seq_len=16, num_train_examples=64),
        "mqar": dict(vocab_size=256, seq_len=64, num_kv_pairs=8),
        "text": dict(seq_len=32),
    }[name]
    sizes = dict(num_train_examples=300, num_test_examples=120, num_valid_examples=100)
    if name == "memorization":
        sizes["num_train_examples"] = 64
    return {**sizes, **base, **settings}


def build(name: str, seed: int, **settings):
    return arrays(tasks.build(name, seed=seed, cache=False, **small(name, **settings)))


# ---- the contract ---------------------------------------------------------------------------


def test_names_are_the_eight_tasks():
    assert tasks.names() == [
        "in_context_recall", "fuzzy_in_context_recall", "noisy_in_context_recall",
        "selective_copying", "compression", "memorization", "mqar", "text",
    ]
    assert IGNORE_INDEX == IGNORE == tasks.IGNORE_INDEX


@pytest.mark.parametrize("name", tasks.names())
def test_splits_shapes_dtypes_and_info(name):
    seed = fresh_seed()
    data = tasks.build(name, seed=seed, cache=False, **small(name))
    assert set(data) == {"train", "validation", "test"}
    info = tasks.info(name, **small(name))
    settings = tasks.validate(name, **small(name))
    sizes = {"train": settings["num_train_examples"], "test": settings["num_test_examples"],
             "validation": settings["num_valid_examples"]}
    for split, ds in data.items():
        assert ds.column_names == ["inputs", "targets"]
        assert ds.features["inputs"].feature.dtype.startswith("int")
        assert ds.num_rows == sizes[split]
    for split, (x, y) in tasks.as_tensors(data).items():
        assert x.dtype == torch.int64 and y.dtype == torch.int64
        assert x.shape == y.shape == (sizes[split], info.seq_len), (split, seed)
        assert int(x.min()) >= 0 and int(x.max()) < info.vocab_size
        scored = y[y != IGNORE]
        assert scored.numel() > 0
        assert int(scored.min()) >= 0 and int(scored.max()) < info.num_classes
        assert bool(((y == IGNORE) | (y >= 0)).all())
    assert info.encoder_decoder == (name == "compression")
    assert info.num_classes == info.vocab_size


# ---- each generator against its definition --------------------------------------------------


def recall_layout(vocab: int, noise: int, multi_query: bool = True, fuzzy: bool = False):
    content = vocab - noise - int(fuzzy) - int(not multi_query)
    return content // 2, content  # keys [0, nk), values [nk, content), noise [content, +noise)


@pytest.mark.parametrize("name", ["in_context_recall", "noisy_in_context_recall"])
def test_recall_scores_exactly_the_values_of_keys_seen_before(name):
    seed = fresh_seed()
    settings = tasks.validate(name, **small(name))
    nk, content = recall_layout(settings["vocab_size"], settings["noise_vocab_size"])
    noise_hi = content + settings["noise_vocab_size"]
    data = build(name, seed)
    for split in ("test", "validation"):
        for x, y in zip(*data[split]):
            full = np.append(x, y[-1])  # the probe's value is the last target
            assert len(full) == settings["seq_len"]
            bound: dict[int, int] = {}
            for t in range(0, len(full), 2):
                k, v = int(full[t]), int(full[t + 1])
                if k >= content:  # a noise slot: two noise tokens, never scored
                    assert content <= k < noise_hi and content <= v < noise_hi, seed
                    assert y[t] == IGNORE and (t == 0 or y[t - 1] == IGNORE)
                    continue
                assert k < nk and nk <= v < content, (seed, k, v)
                if k in bound:
                    assert v == bound[k], f"key {k} changed value (seed {seed})"
                    assert y[t] == v, f"repeated key not scored (seed {seed})"
                else:
                    assert t != len(full) - 2, f"probe key never shown (seed {seed})"
                    bound[k] = v
                    assert y[t] == IGNORE, f"first appearance scored (seed {seed})"
                if t + 1 < len(y):
                    assert y[t + 1] == IGNORE  # value positions predict the next key: unscored
    x, y = data["train"]
    assert np.array_equal(x[:, 1:], y[:, :-1]), "training targets are the shifted inputs"
    assert (y != IGNORE).all()


def test_single_query_recall_scores_only_the_probe_after_the_copy_token():
    seed = fresh_seed()
    settings = tasks.validate("in_context_recall", **small("in_context_recall",
                                                           multi_query=False))
    vocab = settings["vocab_size"]
    nk, content = recall_layout(vocab, 0, multi_query=False)
    data = build("in_context_recall", seed, multi_query=False)
    x, y = data["test"]
    assert x.shape[1] == settings["seq_len"] == tasks.info("in_context_recall",
                                                           **settings).seq_len
    assert (x[:, -2] == vocab - 1).all() and (x[:, :-2] < content).all()  # ... copy key
    assert ((y != IGNORE).sum(axis=1) == 1).all() and (y[:, -1] != IGNORE).all()
    for row, target in zip(x, y):
        bound = dict(zip(row[0:-2:2].tolist(), row[1:-2:2].tolist()))
        assert target[-1] == bound[int(row[-1])], seed


def test_noisy_recall_noise_tokens_come_only_from_the_noise_range():
    seed = fresh_seed()
    settings = tasks.validate("noisy_in_context_recall", **small("noisy_in_context_recall"))
    _, content = recall_layout(settings["vocab_size"], settings["noise_vocab_size"])
    x, _ = build("noisy_in_context_recall", seed)["train"]
    noise = x >= content
    assert noise.any() and (x < content + settings["noise_vocab_size"]).all()
    assert 0.25 < noise.mean() < 0.55, seed  # frac_noise 0.4 of the slots (probe excluded)
    # noise fills whole slots: a pair's two tokens are both noise or both not
    pairs = x[:, : (x.shape[1] // 2) * 2].reshape(len(x), -1, 2) >= content
    assert (pairs[..., 0] == pairs[..., 1]).all()


def parse_fuzzy(seq: np.ndarray, nk: int, content: int, pad: int):
    """Split a fuzzy-recall sequence into (kind, start, tokens) runs after the left padding."""
    start = 0
    while seq[start] == pad:
        start += 1
    kinds = np.where(seq < nk, 0, np.where(seq < content, 1, 2))
    runs, t = [], start
    while t < len(seq):
        u = t
        while u < len(seq) and kinds[u] == kinds[t] and seq[u] != pad:
            u += 1
        assert u > t, "pad token inside the sequence"
        runs.append((int(kinds[t]), t, tuple(int(v) for v in seq[t:u])))
        t = u
    return start, runs


@pytest.mark.parametrize("frac_noise", [0.0, 0.3])
def test_fuzzy_recall_motifs_bind_consistently_and_repeats_are_scored(frac_noise):
    seed = fresh_seed()
    name = "fuzzy_in_context_recall"
    settings = tasks.validate(name, **small(name, frac_noise=frac_noise,
                                            noise_vocab_size=4 if frac_noise else 0))
    k_max, v_max = settings["k_motif_size"], settings["v_motif_size"]
    nk, content = recall_layout(settings["vocab_size"], settings["noise_vocab_size"], fuzzy=True)
    pad = content + settings["noise_vocab_size"]
    data = build(name, seed, frac_noise=frac_noise, noise_vocab_size=4 if frac_noise else 0)
    for split in ("train", "test"):
        for x, y in zip(*data[split]):
            full = np.append(x, y[-1])
            assert len(full) == settings["seq_len"] + 1
            pads, runs = parse_fuzzy(full, nk, content, pad)
            # pairs are added until the sequence is long enough, so padding is short
            assert 2 <= pads <= k_max + v_max + 1, (seed, pads)
            bound: dict[tuple, tuple] = {}
            i = 0
            while i < len(runs):
                kind, start, toks = runs[i]
                if kind == 2:
                    i += 1
                    continue
                assert kind == 0 and runs[i + 1][0] == 1, (seed, runs[i:i + 2])
                key, (v_start, value) = toks, runs[i + 1][1:]
                assert 1 <= len(key) <= k_max and 1 <= len(value) <= v_max, seed
                assert len(set(key)) == len(key) and len(set(value)) == len(value)
                if split == "test":
                    assert len(key) == k_max, "evaluation keys have the full motif size"
                last = i + 2 == len(runs)
                seen_before = key in bound
                if seen_before:
                    assert value == bound[key], f"key {key} changed value (seed {seed})"
                else:
                    assert not last, f"probe key never shown before the query (seed {seed})"
                    bound[key] = value
                if split == "test":  # a repeated key's value tokens are scored, one per position
                    scored = tuple(int(v) for v in y[v_start - 1: v_start - 1 + len(value)])
                    assert scored == (value if seen_before else (IGNORE,) * len(value)), seed
                i += 2
            if split == "train":
                assert np.array_equal(x[1:], y[:-1])
        if split == "test":
            scored_positions = data[split][1] != IGNORE
            assert scored_positions.any(axis=1).all()


def test_selective_copying_targets_are_the_scattered_tokens_in_order():
    seed = fresh_seed()
    settings = tasks.validate("selective_copying", **small("selective_copying"))
    vocab, n, seq_len = settings["vocab_size"], settings["num_tokens_to_copy"], settings["seq_len"]
    blank, copy = vocab - 2, vocab - 1
    data = build("selective_copying", seed)
    for split in data:
        for x, y in zip(*data[split]):
            copy_at = seq_len - n - 1
            assert x[copy_at] == copy and (x == copy).sum() == 1
            assert (x[copy_at + 1:] == blank).all()
            shown = [int(v) for v in x[:copy_at] if v != blank]
            assert len(shown) == n
            assert (y[: copy_at + 1] == IGNORE).all()
            assert [int(v) for v in y[copy_at + 1:]] == shown, seed
            assert x[copy_at - 1] != blank  # mad-lab's layout: last token right before copy
    # blanks really are scattered (the seeded RNG drives them): positions vary across examples
    x, _ = data["train"]
    assert len({tuple(np.flatnonzero(r != blank)) for r in x}) > len(x) // 2


@pytest.mark.parametrize("frac_noise", [0.0, 0.3])
def test_compression_targets_are_the_clean_input(frac_noise):
    seed = fresh_seed()
    extra = dict(frac_noise=frac_noise, noise_vocab_size=3 if frac_noise else 0)
    settings = tasks.validate("compression", **small("compression", **extra))
    vocab = settings["vocab_size"]
    content = vocab - 1 - settings["noise_vocab_size"]
    for x, y in build("compression", seed, **extra).values():
        assert (x[:, -1] == vocab - 1).all() and (y[:, -1] == vocab - 1).all()
        kept = y != IGNORE
        assert np.array_equal(x[kept], y[kept])
        assert (y[kept][y[kept] != vocab - 1] < content).all()
        if frac_noise:
            assert (x[~kept] >= content).all() and (x[~kept] < vocab - 1).all()
            assert 0.15 < (~kept).mean() < 0.45, seed
        else:
            assert kept.all()


def test_memorization_every_example_follows_one_fixed_map():
    seed = fresh_seed()
    settings = tasks.validate("memorization", **small("memorization"))
    vocab = settings["vocab_size"]
    num_keys = (vocab - 1) // 2
    data = build("memorization", seed)
    value_of: dict[int, int] = {}
    for x, y in data.values():
        assert (x[:, 1::2] == vocab - 1).all() and (y[:, 0::2] == IGNORE).all()
        for k, v in zip(x[:, 0::2].ravel(), y[:, 1::2].ravel()):
            assert 0 <= k < num_keys and num_keys <= v < vocab - 1
            assert value_of.setdefault(int(k), int(v)) == v, f"key {k} has two values ({seed})"
    values = list(value_of.values())
    assert len(set(values)) == len(values), "the map sends distinct keys to distinct values"
    again = build("memorization", seed, num_train_examples=32)["test"]
    for k, v in zip(again[0][:, 0::2].ravel(), again[1][:, 1::2].ravel()):
        assert value_of.get(int(k), int(v)) == v, "the map depends on the seed only"


def test_mqar_queries_are_answered_by_their_keys_value():
    seed = fresh_seed()
    settings = tasks.validate("mqar", **small("mqar"))
    vocab, k, seq_len = settings["vocab_size"], settings["num_kv_pairs"], settings["seq_len"]
    assert 4 * k <= seq_len
    gaps = []
    for x, y in build("mqar", seed).values():
        for row, target in zip(x, y):
            keys, values = row[0:2 * k:2], row[1:2 * k:2]
            assert len(set(keys)) == k and len(set(values)) == k
            assert ((keys >= 1) & (keys < vocab // 2)).all()
            assert ((values >= vocab // 2) & (values < vocab)).all()
            assert (target[: 2 * k] == IGNORE).all()
            asked = np.flatnonzero(target != IGNORE)
            assert len(asked) == k and ((asked - 2 * k) % 2 == 0).all()
            value_of = dict(zip(keys.tolist(), values.tolist()))
            assert sorted(row[asked].tolist()) == sorted(keys.tolist()), "each key asked once"
            for t in asked:
                assert target[t] == value_of[int(row[t])], seed
            gaps += ((asked - 2 * k) // 2).tolist()
    # power law with a = 0.01: short gaps are much likelier than long ones
    gaps = np.array(gaps)
    space = (seq_len - 2 * k) // 2
    assert (gaps < space // 4).mean() > (gaps >= 3 * space // 4).mean()


# ---- determinism, disjointness --------------------------------------------------------------


def digest(data: dict) -> str:
    h = hashlib.sha256()
    for split in ("train", "validation", "test"):
        for a in data[split]:
            h.update(np.ascontiguousarray(a, dtype=np.int64).tobytes())
    return h.hexdigest()


@pytest.mark.parametrize("name", tasks.names())
def test_same_seed_same_data_other_seed_other_data(name):
    seed = fresh_seed()
    first, second = build(name, seed), build(name, seed)
    assert digest(first) == digest(second)
    other = build(name, seed + 1)
    assert not np.array_equal(first["train"][0], other["train"][0])


def test_same_seed_same_data_in_another_process():
    seed = fresh_seed()
    settings = small("fuzzy_in_context_recall")
    here = digest(build("fuzzy_in_context_recall", seed))
    code = (
        "import hashlib, sys, numpy as np\n"
        "from mad_search import tasks\n"
        f"data = tasks.build('fuzzy_in_context_recall', seed={seed}, cache=False, **{settings!r})\n"
        "h = hashlib.sha256()\n"
        "for split in ('train', 'validation', 'test'):\n"
        "    for c in ('inputs', 'targets'):\n"
        "        a = np.asarray(data[split].with_format('numpy')[c], dtype=np.int64)\n"
        "        h.update(np.ascontiguousarray(a).tobytes())\n"
        "print(h.hexdigest())\n"
    )
    env = {**os.environ, "PYTHONHASHSEED": str(fresh_seed()), "PYTHONPATH": str(ROOT)}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                         cwd=ROOT, check=True)
    assert out.stdout.strip() == here


@pytest.mark.parametrize("name", [n for n in tasks.names() if n != "text"])
def test_no_input_sequence_is_in_two_splits(name):
    data = build(name, fresh_seed())
    rows = {s: {r.tobytes() for r in x} for s, (x, _) in data.items()}
    assert not rows["train"] & rows["test"]
    assert not rows["train"] & rows["validation"]
    assert not rows["validation"] & rows["test"]


def test_tiny_task_spaces_are_redrawn_until_disjoint_or_refused():
    seed = fresh_seed()
    # compression with 3 content tokens and 3 free positions: 27 possible inputs
    data = build("compression", seed, vocab_size=4, seq_len=4, num_train_examples=12,
                 num_test_examples=5, num_valid_examples=5)
    train = {r.tobytes() for r in data["train"][0]}
    assert not train & {r.tobytes() for r in data["test"][0]}
    assert not train & {r.tobytes() for r in data["validation"][0]}
    with pytest.raises(TaskError, match="too few distinct sequences"):
        build("compression", seed, vocab_size=3, seq_len=3, num_train_examples=60,
              num_test_examples=5)


def test_validation_split_follows_the_test_distribution():
    seed = fresh_seed()
    data = build("in_context_recall", seed, num_test_examples=400, num_valid_examples=400)
    (xv, yv), (xt, yt) = data["validation"], data["test"]
    assert not np.array_equal(xv, xt)
    assert abs((yv != IGNORE).mean() - (yt != IGNORE).mean()) < 0.03
    settings = tasks.validate("in_context_recall", num_test_examples=77)
    assert settings["num_valid_examples"] == 77


# ---- settings errors ------------------------------------------------------------------------


BAD_SETTINGS = [
    ("in_context_recall", dict(vocab_sise=16), "vocab_sise"),
    ("in_context_recall", dict(num_train_examples=0), "num_train_examples"),
    ("in_context_recall", dict(num_test_examples=-5), "num_test_examples"),
    ("in_context_recall", dict(num_valid_examples=0), "num_valid_examples"),
    ("in_context_recall", dict(seq_len=0), "seq_len"),
    ("in_context_recall", dict(seq_len=63), "seq_len"),
    ("in_context_recall", dict(vocab_size=1), "vocab_size"),
    ("in_context_recall", dict(vocab_size=1.5), "vocab_size"),
    ("in_context_recall", dict(multi_query="yes"), "multi_query"),
    ("noisy_in_context_recall", dict(vocab_size=17), "vocab_size"),
    ("noisy_in_context_recall", dict(frac_noise=1.0), "frac_noise"),
    ("noisy_in_context_recall", dict(noise_vocab_size=0), "frac_noise"),
    ("fuzzy_in_context_recall", dict(vocab_size=6), "vocab_size"),
    ("fuzzy_in_context_recall", dict(seq_len=12), "seq_len"),
    ("fuzzy_in_context_recall", dict(k_motif_size=0), "k_motif_size"),
    ("selective_copying", dict(num_tokens_to_copy=128), "num_tokens_to_copy"),
    ("selective_copying", dict(vocab_size=2), "vocab_size"),
    ("compression", dict(vocab_size=5, noise_vocab_size=4, frac_noise=0.1), "vocab_size"),
    ("memorization", dict(seq_len=31), "seq_len"),
    ("memorization", dict(vocab_size=2), "vocab_size"),
    ("mqar", dict(num_kv_pairs=17), "num_kv_pairs"),
    ("mqar", dict(vocab_size=64), "vocab_size"),
    ("mqar", dict(seq_len=63), "seq_len"),
    ("mqar", dict(power_a=0), "power_a"),
    ("mqar", dict(vocab_size=2**31), "vocab_size"),
    ("text", dict(tokenizer="sentencepiece"), "tokenizer"),
    ("text", dict(vocab_size=300), "vocab_size"),
    ("text", dict(tokenizer="word", vocab_size=2), "vocab_size"),
    ("text", dict(files="/nonexistent/corpus.txt"), "files"),
    ("text", dict(files="/nonexistent/*.txt"), "files"),
    ("text", dict(files=[]), "files"),
    ("text", dict(test_fraction=0.6, valid_fraction=0.5), "test_fraction"),
]


@pytest.mark.parametrize("name,settings,offender", BAD_SETTINGS,
                         ids=[f"{n}-{o}-{i}" for i, (n, _, o) in enumerate(BAD_SETTINGS)])
def test_bad_settings_raise_one_line_naming_the_setting(name, settings, offender):
    with pytest.raises(TaskError) as err:
        tasks.validate(name, **settings)
    message = str(err.value)
    assert "\n" not in message and offender in message and name in message, message
    with pytest.raises(TaskError):
        tasks.build(name, cache=False, **settings)


def test_unknown_task_and_setting_list_what_is_valid():
    with pytest.raises(TaskError, match="valid tasks: in_context_recall, .*text"):
        tasks.validate("recall")
    with pytest.raises(TaskError, match="valid settings: .*num_tokens_to_copy"):
        tasks.validate("selective_copying", frac_noise=0.1)
    with pytest.raises(TaskError, match="seed"):
        tasks.build("compression", seed=-1, cache=False)


def test_mqar_limits_match_zoology():
    tasks.validate("mqar", seq_len=64, num_kv_pairs=16, vocab_size=65)
    with pytest.raises(TaskError, match="4\\*num_kv_pairs"):
        tasks.validate("mqar", seq_len=64, num_kv_pairs=17)
    with pytest.raises(TaskError, match="greater than seq_len"):
        tasks.validate("mqar", seq_len=64, vocab_size=64)


def test_resolved_settings_validate_to_themselves():
    for name in tasks.names():
        resolved = tasks.validate(name)
        assert tasks.validate(name, **resolved) == resolved
        assert tasks.validate(name, name=name, **resolved) == resolved  # config groups carry it


# ---- cache ----------------------------------------------------------------------------------


def test_cache_round_trip_equals_a_fresh_build(tmp_path, monkeypatch):
    monkeypatch.setenv("MAD_SEARCH_CACHE", str(tmp_path))
    seed = fresh_seed()
    settings = small("noisy_in_context_recall")
    fresh = arrays(tasks.build("noisy_in_context_recall", seed=seed, cache=False, **settings))
    first = arrays(tasks.build("noisy_in_context_recall", seed=seed, **settings))
    entries = [p for p in tmp_path.iterdir() if p.name.startswith("noisy_in_context_recall-")]
    assert len(entries) == 1
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")], "no temp folders left"
    loaded = arrays(tasks.build("noisy_in_context_recall", seed=seed, **settings))
    assert digest(fresh) == digest(first) == digest(loaded)
    # another seed or setting is another entry
    tasks.build("noisy_in_context_recall", seed=seed + 1, **settings)
    assert len([p for p in tmp_path.iterdir() if not p.name.startswith(".")]) == 2


def test_a_broken_cache_entry_is_rebuilt(tmp_path, monkeypatch):
    monkeypatch.setenv("MAD_SEARCH_CACHE", str(tmp_path))
    settings = small("compression")
    want = digest(arrays(tasks.build("compression", seed=3, cache=False, **settings)))
    tasks.build("compression", seed=3, **settings)
    (entry,) = list(tmp_path.iterdir())
    for f in entry.rglob("*.arrow"):
        f.write_bytes(b"not arrow")
    assert digest(arrays(tasks.build("compression", seed=3, **settings))) == want
    assert digest(arrays(tasks.build("compression", seed=3, **settings))) == want


def test_losing_a_cache_race_keeps_the_winners_entry(tmp_path, monkeypatch):
    """Two processes build the same entry: the second rename fails and nothing breaks."""
    from mad_search.tasks import cache

    monkeypatch.setenv("MAD_SEARCH_CACHE", str(tmp_path))
    settings = small("selective_copying")
    want = digest(arrays(tasks.build("selective_copying", seed=5, cache=False, **settings)))
    real_rename = os.rename

    def rename_after_a_rival(src, dst):
        # a rival process finishes first: its complete entry is already at dst
        rival = tmp_path / "rival"
        tasks.build("selective_copying", seed=5, cache=False, **settings).save_to_disk(rival)
        real_rename(rival, dst)
        real_rename(src, dst)  # raises: dst exists and is not empty

    monkeypatch.setattr(cache.os, "rename", rename_after_a_rival)
    assert digest(arrays(tasks.build("selective_copying", seed=5, **settings))) == want
    monkeypatch.setattr(cache.os, "rename", real_rename)
    assert [p.name for p in tmp_path.iterdir()] == [p.name for p in tmp_path.iterdir()
                                                    if p.name.startswith("selective_copying-")]
    assert digest(arrays(tasks.build("selective_copying", seed=5, **settings))) == want


# ---- grid and YAML defaults -----------------------------------------------------------------


def test_grid_has_66_settings_one_change_from_each_baseline():
    entries = tasks.grid()
    assert len(entries) == 66
    per_task = {}
    for e in entries:
        per_task[e["task"]] = per_task.get(e["task"], 0) + 1
        assert e["seed"] == 12345
    assert per_task == {"in_context_recall": 11, "fuzzy_in_context_recall": 11,
                        "noisy_in_context_recall": 14, "selective_copying": 13,
                        "compression": 11, "memorization": 6}
    baselines = {e["task"]: e["settings"] for e in entries if e["varied"] is None}
    assert len(baselines) == 6
    for e in entries:
        if e["varied"] is None:
            assert e["settings"] == tasks.validate(e["task"]), "baselines are the task defaults"
            continue
        base = baselines[e["task"]]
        changed = {k for k in base if base[k] != e["settings"][k]}
        assert changed == {e["varied"]}, e["id"]
    assert len(tasks.grid("memorization")) == 6
    with pytest.raises(TaskError, match="no difficulty grid"):
        tasks.grid("mqar")


def test_every_grid_setting_is_valid_and_its_shape_known():
    for e in tasks.grid():
        info = tasks.info(e["task"], **e["settings"])
        assert info.seq_len in (e["settings"]["seq_len"], e["settings"]["seq_len"] - 1)


@pytest.mark.parametrize("name", tasks.names())
def test_yaml_defaults_equal_python_defaults(name):
    with open(ROOT / "conf" / "task" / f"{name}.yaml", encoding="utf-8") as f:
        conf = yaml.safe_load(f)
    assert conf.pop("name") == name
    assert conf == tasks.defaults(name)
    assert list(conf) == list(tasks.defaults(name)), "same order, for readers"


# ---- text -----------------------------------------------------------------------------------


def write_corpus(path: Path, paragraphs: int = 400) -> Path:
    r = random.Random(fresh_seed())
    words = "the a river mill stone bright cold north wind boat rope quiet old field".split()
    text = "\n\n".join(" ".join(r.choice(words) for _ in range(r.randint(5, 30))) + "."
                       for _ in range(paragraphs))
    path.write_text(text, encoding="utf-8")
    return path


@pytest.mark.parametrize("tokenizer", ["byte", "word"])
def test_text_windows_are_next_token_prediction_over_disjoint_regions(tmp_path, tokenizer):
    from mad_search.tasks import text as text_task

    corpus = write_corpus(tmp_path / "c.txt")
    extra = dict(files=str(corpus), tokenizer=tokenizer, seq_len=16)
    if tokenizer == "word":
        extra["vocab_size"] = 8  # fewer than the words: some become <unk>
    settings = tasks.validate("text", **small("text", **extra))
    info = tasks.info("text", **settings)
    data = build("text", fresh_seed(), **extra)
    for split, (x, y) in data.items():
        assert np.array_equal(x[:, 1:], y[:, :-1]), split
        assert x.max() < info.vocab_size and (y != IGNORE).all()
    if tokenizer == "word":
        assert info.vocab_size == 8 and (data["train"][0] == 0).any()  # <unk> is id 0
        assert (data["train"][0] == 1).any()  # <eos> between paragraphs
    else:
        assert info.vocab_size == 257 and (data["train"][0] == 256).any()
        for window in (data["test"][0][0], data["train"][0][-1]):
            text = b"".join(bytes([t]) if t < 256 else b"\n\n" for t in window.tolist())
            assert text.decode("utf-8") in corpus.read_text(), "windows are spans of the corpus"
    # every window lies inside its own region: train first, then validation, then test
    stream, n_valid, n_test = text_task.tokenize(
        settings, text_task.read_paragraphs([corpus]))
    bounds = {"train": (0, len(stream) - n_valid - n_test),
              "validation": (len(stream) - n_valid - n_test, len(stream) - n_test),
              "test": (len(stream) - n_test, len(stream))}
    width = settings["seq_len"] + 1
    for split, (lo, hi) in bounds.items():
        spans = {stream[i:i + width].tobytes() for i in range(lo, hi - width + 1)}
        x, y = data[split]
        full = np.concatenate([x, y[:, -1:]], axis=1).astype(np.int32)
        assert all(row.tobytes() in spans for row in full), split


def test_text_default_corpus_builds_with_no_settings(tmp_path, monkeypatch):
    monkeypatch.setenv("MAD_SEARCH_CACHE", str(tmp_path))
    settings = tasks.validate("text")
    assert settings["files"] is None and settings["vocab_size"] == 257
    data = arrays(tasks.build("text", seed=fresh_seed(), num_train_examples=500))
    assert data["train"][0].shape == (500, 128)
    assert data["test"][0].shape == (1280, 128)
    # real English bytes: the common words appear (over 8 windows: one 128-byte window can miss
    # both, e.g. "the grain, which will spoil a rake in a season. A good rake\nshould last...")
    rows = data["train"][0][:8]
    text = bytes(int(b) for row in rows for b in row if b < 256).decode("utf-8", "replace")
    assert " the " in text or " of " in text
    # the bundled corpus repeats no 129-byte span across regions: no window is in two splits
    rows = {s: {r.tobytes() for r in x} for s, (x, _) in data.items()}
    assert not rows["train"] & (rows["test"] | rows["validation"])


def test_text_missing_or_empty_files_are_refused(tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    with pytest.raises(TaskError, match="empty"):
        tasks.validate("text", files=str(empty))
    with pytest.raises(TaskError, match="does not exist"):
        tasks.validate("text", files=[str(tmp_path / "absent.txt")])
    blank = tmp_path / "blank.txt"
    blank.write_text("\n\n  \n")
    with pytest.raises(TaskError, match="too few"):
        tasks.build("text", files=str(blank), cache=False)
    (tmp_path / "sub").mkdir()
    with pytest.raises(TaskError, match="no \\*.txt"):
        tasks.validate("text", files=str(tmp_path / "sub"))
    tiny = tmp_path / "tiny.txt"
    tiny.write_text("just a few words here.")
    with pytest.raises(TaskError, match="too few"):
        tasks.build("text", files=str(tiny), cache=False)


def test_text_globs_folders_and_lists_resolve_to_files(tmp_path):
    a = write_corpus(tmp_path / "a.txt", 50)
    b = write_corpus(tmp_path / "b.txt", 50)
    by_glob = tasks.validate("text", files=str(tmp_path / "*.txt"))["files"]
    by_folder = tasks.validate("text", files=str(tmp_path))["files"]
    by_list = tasks.validate("text", files=[str(b), str(a)])["files"]
    assert by_glob == by_folder == [str(a), str(b)]
    assert by_list == [str(b), str(a)]


# ---- metrics --------------------------------------------------------------------------------


def slow_accuracy(preds, targets, num_classes, average, ignore_index=IGNORE):
    """Independent reference: plain Python loops over positions, then classes."""
    pairs = [(int(p), int(t)) for p, t in zip(preds.reshape(-1), targets.reshape(-1))
             if int(t) != ignore_index]
    if not pairs:
        return 0.0
    if average == "micro":
        return sum(p == t for p, t in pairs) / len(pairs)
    recalls = []
    for c in range(num_classes):
        tp = sum(1 for p, t in pairs if p == t == c)
        fn = sum(1 for p, t in pairs if t == c and p != c)
        fp = sum(1 for p, t in pairs if p == c and t != c)
        if tp + fp + fn == 0:
            continue  # torchmetrics >= 1.0: a class never seen nor predicted is left out
        recalls.append(tp / (tp + fn) if tp + fn else 0.0)
    return sum(recalls) / len(recalls) if recalls else 0.0


@pytest.mark.parametrize("average", ["macro", "micro"])
def test_accuracy_matches_a_slow_reference_on_random_data(average):
    g = torch.Generator().manual_seed(fresh_seed())
    for _ in range(20):
        num_classes = int(torch.randint(2, 30, (1,), generator=g))
        used = int(torch.randint(1, num_classes + 1, (1,), generator=g))  # some classes absent
        shape = (int(torch.randint(1, 6, (1,), generator=g)), int(torch.randint(1, 40, (1,),
                                                                                generator=g)))
        targets = torch.randint(0, used, shape, generator=g)
        preds = torch.where(torch.rand(shape, generator=g) < 0.5, targets,
                            torch.randint(0, num_classes, shape, generator=g))
        targets[torch.rand(shape, generator=g) < 0.3] = IGNORE
        want = slow_accuracy(preds, targets, num_classes, average)
        got = tasks.accuracy(preds, targets, num_classes, average=average)
        assert got == pytest.approx(want, abs=1e-12)
        meter = tasks.AccuracyMeter(num_classes, average=average)
        cuts = sorted(torch.randint(0, shape[0] + 1, (2,), generator=g).tolist())
        for lo, hi in zip([0, *cuts], [*cuts, shape[0]]):
            meter.update(preds[lo:hi], targets[lo:hi])
        assert meter.compute() == pytest.approx(want, abs=1e-12)


def test_macro_accuracy_follows_torchmetrics_on_absent_and_predicted_only_classes():
    # torchmetrics' own doc example: 0.8333 for 3 classes; unused classes 3 and 4 change nothing
    target, preds = torch.tensor([2, 1, 0, 0]), torch.tensor([2, 1, 0, 1])
    assert tasks.accuracy(preds, target, 3) == pytest.approx(5 / 6)
    assert tasks.accuracy(preds, target, 5) == pytest.approx(5 / 6)
    # class 2 is predicted but never a target: it counts, with recall 0
    assert tasks.accuracy(torch.tensor([0, 2, 1]), torch.tensor([0, 0, 1]), 4) == pytest.approx(
        (0.5 + 1.0 + 0.0) / 3)
    assert tasks.accuracy(torch.tensor([0, 2, 1]), torch.tensor([0, 0, 1]), 4,
                          average="micro") == pytest.approx(2 / 3)
    # ignored positions do not count, whatever was predicted there
    assert tasks.accuracy(torch.tensor([3, 1]), torch.tensor([IGNORE, 1]), 4) == 1.0
    assert tasks.accuracy(torch.tensor([3]), torch.tensor([IGNORE]), 4) == 0.0


def test_accuracy_takes_logits_with_classes_last():
    targets = torch.tensor([[1, 2, IGNORE]])
    logits = torch.zeros(1, 3, 5)
    logits[0, 0, 1] = logits[0, 1, 3] = logits[0, 2, 4] = 1.0
    assert tasks.accuracy(logits, targets, 5, average="micro") == 0.5
    with pytest.raises(ValueError):
        tasks.accuracy(torch.tensor([7]), torch.tensor([1]), 5)


# ---- the registry ---------------------------------------------------------------------------


def counting_task(name: str = "tiny_counting") -> Task:
    """A small task of our own: after each token, predict how many tokens so far equal it."""

    def sample(settings, n, training, rng, shared=None):
        x = rng.integers(0, settings["vocab_size"], size=(n, settings["seq_len"]))
        same = x[:, :, None] == x[:, None, :]  # (n, t, s)
        y = np.tril(same).sum(-1) - 1  # earlier equal tokens, excluding itself
        return x, np.minimum(y, settings["vocab_size"] - 1)

    def check(settings):
        check_sizes(name, settings)
        return settings

    return Task(
        name=name,
        defaults={"vocab_size": 8, "seq_len": 12, "num_train_examples": 40,
                  "num_test_examples": 10, "num_valid_examples": None},
        check=check,
        info=lambda s: TaskInfo(vocab_size=s["vocab_size"], seq_len=s["seq_len"]),
        splits=lambda s, seed: synthetic_splits(name, s, seed, sample),
    )


def make_counting_task() -> Task:
    """A factory an entry point can name (object form)."""
    return counting_task("ep_counting")


COUNTING_INSTANCE = counting_task("ep_counting_instance")

TASK_MODULE = f"""
    from mad_search.tasks import register
    from {__name__} import counting_task

    @register("module_counting")
    def module_counting():
        return counting_task("module_counting")
"""


@pytest.fixture
def scratch_tasks(monkeypatch):
    """Tasks registered inside a test disappear after it; entry points are loaded afresh."""
    saved = dict(task_registry._REGISTRY)
    monkeypatch.setattr(task_registry, "_entry_points_loaded", False)
    yield
    task_registry._REGISTRY.clear()
    task_registry._REGISTRY.update(saved)


def fake_entry_points(monkeypatch, *pairs):
    eps = [EntryPoint(name, value, tasks.ENTRY_POINT_GROUP) for name, value in pairs]
    monkeypatch.setattr(plugins, "entry_points",
                        lambda group: eps if group == tasks.ENTRY_POINT_GROUP else [])


def assert_split_contract(name: str, seed: int, **settings):
    data = tasks.build(name, seed=seed, cache=False, **settings)
    assert set(data) == {"train", "validation", "test"}
    info = tasks.info(name, **settings)
    for split, (x, y) in tasks.as_tensors(data).items():
        assert x.shape == y.shape and x.shape[1] == info.seq_len, (split, seed)
        assert x.shape[0] > 0
    return arrays(data)


def test_registered_factory_task_builds_and_follows_the_contract(scratch_tasks):
    seed = fresh_seed()
    factory = tasks.register("tiny_counting")(counting_task)
    assert factory is counting_task  # the decorator hands the factory back
    assert tasks.names()[-1] == "tiny_counting"  # no order: after the built-ins
    assert tasks.defaults("tiny_counting")["num_valid_examples"] is None
    data = assert_split_contract("tiny_counting", seed)
    x, y = data["test"]
    for row, target in zip(x, y):  # each target counts earlier copies of its token
        assert list(target) == [min(list(row[:t]).count(v), 7) for t, v in enumerate(row)], seed


def test_order_places_a_task_among_the_built_ins(scratch_tasks):
    tasks.register("tiny_counting", order=15)(counting_task)
    assert tasks.names()[:3] == ["in_context_recall", "tiny_counting", "fuzzy_in_context_recall"]
    with pytest.raises(TaskError, match="order must be a number"):
        tasks.register("ep_counting", order="first")(make_counting_task)


def test_duplicate_task_name_is_refused_in_one_line_naming_both(scratch_tasks):
    owner = tasks.get("mqar")

    def mqar():
        return counting_task("mqar")

    with pytest.raises(TaskError) as err:
        tasks.register("mqar")(mqar)
    message = str(err.value)
    assert "\n" not in message
    assert "task name 'mqar' is already registered by mad_search.tasks.mqar.mqar" in message
    assert f"{mqar.__module__}.{mqar.__qualname__}" in message
    assert tasks.get("mqar") is owner


def test_same_factory_registered_again_is_accepted(scratch_tasks):
    tasks.register("tiny_counting")(counting_task)
    first = tasks.get("tiny_counting")
    tasks.register("tiny_counting")(counting_task)  # e.g. a module imported twice
    assert tasks.get("tiny_counting") is not first  # replaced by the fresh Task
    assert tasks.names().count("tiny_counting") == 1


def test_reloading_a_task_module_replaces_its_task(scratch_tasks, tmp_path, monkeypatch):
    (tmp_path / "reloaded_task.py").write_text(textwrap.dedent(TASK_MODULE))
    monkeypatch.syspath_prepend(str(tmp_path))
    module = importlib.import_module("reloaded_task")
    first = tasks.get("module_counting")
    importlib.reload(module)
    assert tasks.get("module_counting") is not first
    assert "module_counting" in tasks.names()
    sys.modules.pop("reloaded_task")


def test_a_factory_must_return_a_task_of_its_name(scratch_tasks):
    with pytest.raises(TaskError, match="returned dict, not a mad_search.tasks.Task"):
        tasks.register("not_a_task")(lambda: {"name": "not_a_task"})
    with pytest.raises(TaskError, match="registered as 'other_name' but its Task is named "
                                        "'tiny_counting'"):
        tasks.register("other_name")(counting_task)
    with pytest.raises(TaskError, match="not valid"):
        tasks.register("bad name")(counting_task)
    assert "not_a_task" not in tasks.names() and "other_name" not in tasks.names()


def test_entry_point_object_forms_register_under_the_entry_point_name(scratch_tasks,
                                                                      monkeypatch):
    fake_entry_points(monkeypatch,
                      ("ep_counting", f"{__name__}:make_counting_task"),
                      ("ep_counting_instance", f"{__name__}:COUNTING_INSTANCE"))
    names = tasks.names()  # loads the entry points
    assert names[-2:] == ["ep_counting", "ep_counting_instance"]
    assert names[:8] == BUILT_IN
    assert tasks.get("ep_counting_instance") is COUNTING_INSTANCE
    for name in ("ep_counting", "ep_counting_instance"):
        assert_split_contract(name, fresh_seed(), seq_len=9, num_train_examples=30)
    tasks.load_entry_points()  # once per process: nothing happens the second time
    assert tasks.names() == names


def test_entry_point_naming_a_decorated_factory_changes_nothing(scratch_tasks, monkeypatch):
    tasks.register("ep_counting")(make_counting_task)
    held = task_registry._REGISTRY["ep_counting"]
    fake_entry_points(monkeypatch, ("ep_counting", f"{__name__}:make_counting_task"))
    tasks.load_entry_points()
    assert task_registry._REGISTRY["ep_counting"] is held


def test_entry_point_module_form_imports_the_module(scratch_tasks, tmp_path, monkeypatch):
    (tmp_path / "ep_task_module.py").write_text(textwrap.dedent(TASK_MODULE))
    monkeypatch.syspath_prepend(str(tmp_path))
    fake_entry_points(monkeypatch, ("just_a_label", "ep_task_module"))
    try:
        assert "module_counting" in tasks.names() and "just_a_label" not in tasks.names()
        assert_split_contract("module_counting", fresh_seed())
    finally:
        sys.modules.pop("ep_task_module", None)


@pytest.mark.parametrize("value, expected", [
    ("no_such_module_for_tasks", "failed to import: No module named 'no_such_module_for_tasks'"),
    (f"{__name__}:IGNORE", "names a int; expected a module, a Task or a zero-argument factory"),
    (f"{__name__}:counting_task", "registered as 'ep_broken' but its Task is named"),
    (f"{__name__}:TASK_MODULE", "names a str"),
], ids=["import", "not_callable", "wrong_name", "string"])
def test_broken_task_entry_point_is_a_one_line_error(scratch_tasks, monkeypatch, value, expected):
    fake_entry_points(monkeypatch, ("ep_broken", value))
    with pytest.raises(TaskError) as err:
        tasks.names()
    message = str(err.value)
    assert "\n" not in message and expected in message, message
    assert "ep_broken" in message


def test_a_task_whose_splits_break_the_contract_is_refused_in_one_line(scratch_tasks):
    good = counting_task("short_splits")

    def short_splits():
        def splits(s, seed):
            out = good.splits(s, seed)
            x, y = out["validation"]
            return {**out, "validation": (x, y[:, :-1])}

        return Task(name="short_splits", defaults=good.defaults, check=good.check,
                    info=good.info, splits=splits)

    tasks.register("short_splits")(short_splits)
    with pytest.raises(TaskError) as err:
        tasks.build("short_splits", seed=fresh_seed(), cache=False)
    message = str(err.value)
    assert "\n" not in message and "short_splits" in message
    assert "splits()['validation'] targets must be (examples, 12) integers" in message


def test_tasks_package_imports_no_datasets_until_a_build():
    code = ("import sys; from mad_search import tasks; tasks.names(); "
            "tasks.info('mqar'); tasks.defaults('text'); "
            "print('datasets' in sys.modules, 'pyarrow' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         cwd=ROOT, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["False", "False"]


def test_every_task_module_is_found_without_a_list():
    """Built-in task modules are discovered: each non-infrastructure module registered a task."""
    import pkgutil

    modules = {m.name for m in pkgutil.iter_modules(tasks.__path__)} - tasks._NOT_TASKS
    origins = {task_registry._REGISTRY[n].source.__module__.rsplit(".", 1)[-1]
               for n in BUILT_IN}
    assert origins == modules
    assert not any(hasattr(sys.modules[f"mad_search.tasks.{m}"], "TASKS") for m in modules)


def test_a_registered_task_without_yaml_can_be_listed_in_a_sweep(scratch_tasks):
    """``study.tasks`` names a task that has no conf/task YAML (a plug-in's): its registered
    defaults are the base its listed settings override, and trial plans resolve on it."""
    from hydra import compose, initialize_config_module

    from mad_search.settings import StudySettings
    from mad_search.sweep import plans_for, task_cfgs

    tasks.register("sweep_counting")(lambda: counting_task("sweep_counting"))
    vocab = int(np.random.default_rng().integers(4, 30))
    with initialize_config_module(config_module="conf", version_base="1.3"):
        cfg = compose("config", overrides=["+sweep=layer_patterns"])
    study = StudySettings.from_config(
        {"tasks": ["sweep_counting", {"name": "sweep_counting", "vocab_size": vocab}]}
    )
    plain, overridden = task_cfgs(cfg, study)
    assert plain == {"name": "sweep_counting", **tasks.defaults("sweep_counting")}
    assert overridden == {**plain, "vocab_size": vocab}
    plans = plans_for(cfg, [plain, overridden], {"model.pattern": ["attention"]})
    assert [p.task_info.vocab_size for p in plans] == [8, vocab]


def test_text_bpe_tokenizer_round_trips_text_and_is_cached(tmp_path, monkeypatch):
    """Byte-level BPE: any text (unicode, words never seen) decodes back exactly; the vocabulary
    stays within vocab_size; the trained tokenizer is cached and reused without retraining."""
    from mad_search.tasks import text as text_task

    monkeypatch.setenv("MAD_SEARCH_CACHE", str(tmp_path / "cache"))
    corpus = write_corpus(tmp_path / "c.txt")
    vocab = random.randint(280, 400)
    settings = tasks.validate("text", files=str(corpus), tokenizer="bpe", vocab_size=vocab)
    tok = text_task.bpe_tokenizer(settings)
    assert 257 < tok.get_vocab_size() <= vocab and tok.token_to_id("<eos>") == 0
    r = random.Random(fresh_seed())
    samples = ["the river mill, quiet north wind.", "Grüße aus Zürich: 東京 ☃ ñ — ok?"]
    samples.append("".join(chr(r.randint(32, 0x2FFF)) for _ in range(200)))
    for text in samples:
        assert tok.decode(tok.encode(text).ids) == text
    assert len(tok.encode("the river mill stone").ids) < len("the river mill stone")  # merges

    cached = list((tmp_path / "cache" / "bpe").glob("*.json"))
    assert len(cached) == 1
    import tokenizers.trainers

    def no_training(*args, **kwargs):
        raise AssertionError("retrained instead of loading the cached tokenizer")

    monkeypatch.setattr(tokenizers.trainers, "BpeTrainer", no_training)
    assert text_task.bpe_tokenizer(settings).get_vocab() == tok.get_vocab()
    other = tasks.validate("text", files=str(corpus), tokenizer="bpe", vocab_size=vocab + 1)
    with pytest.raises(AssertionError, match="retrained"):
        text_task.bpe_tokenizer(other)  # another vocab_size is another tokenizer


def test_text_bpe_windows_are_next_token_prediction_and_learn_only_from_training_text(
    tmp_path, monkeypatch
):
    """The BPE merges come from the training region alone: a word that only the test region
    holds (hundreds of times) is never merged into one token; windows decode to corpus text."""
    from mad_search.tasks import text as text_task

    monkeypatch.setenv("MAD_SEARCH_CACHE", str(tmp_path / "cache"))
    corpus = write_corpus(tmp_path / "c.txt", 300)
    secret = "zqxjvkw"
    tail = "\n\n".join(" ".join([secret] * 20) + "." for _ in range(40))
    corpus.write_text(corpus.read_text() + "\n\n" + tail, encoding="utf-8")
    extra = dict(files=str(corpus), tokenizer="bpe", vocab_size=512, seq_len=16)
    settings = tasks.validate("text", **small("text", **extra))
    data = build("text", fresh_seed(), **extra)
    tok = text_task.bpe_tokenizer(settings)
    assert not any("zq" in piece or "xj" in piece for piece in tok.get_vocab())
    for split, (x, y) in data.items():
        assert np.array_equal(x[:, 1:], y[:, :-1]), split
        assert x.max() < settings["vocab_size"] and (y != IGNORE).all()
    text = corpus.read_text()
    for row in data["train"][0][:20].tolist():
        pieces = tok.decode(row, skip_special_tokens=False).split("<eos>")
        assert all(p in text for p in pieces)
    assert secret in tok.decode(data["test"][0].reshape(-1).tolist())


def test_text_bpe_vocab_size_must_hold_the_bytes():
    with pytest.raises(TaskError, match="vocab_size") as err:
        tasks.validate("text", tokenizer="bpe", vocab_size=100)
    assert "\n" not in str(err.value)
    assert tasks.validate("text", tokenizer="bpe")["vocab_size"] == 4096


@pytest.mark.parametrize("tokenizer", ["byte", "word", "bpe"])
def test_text_document_split_keeps_each_file_in_one_split(tmp_path, monkeypatch, tokenizer):
    """split=document: whole files go to train, validation and test (a seeded shuffle); every
    window comes from its own split's files; the word vocabulary knows the training files only."""
    from mad_search.tasks import text as text_task

    monkeypatch.setenv("MAD_SEARCH_CACHE", str(tmp_path / "cache"))
    folder = tmp_path / "docs"
    folder.mkdir()
    for i in range(5):  # each document has its own marker word, repeated
        body = write_corpus(folder / f"d{i}.txt", 60).read_text()
        marker = f"qz{i}x"  # no marker is a prefix of another
        (folder / f"d{i}.txt").write_text(body.replace("river", marker), encoding="utf-8")
    seed = fresh_seed()
    extra = dict(files=str(folder), tokenizer=tokenizer, seq_len=16, split="document")
    if tokenizer != "byte":
        extra["vocab_size"] = 300 if tokenizer == "bpe" else 40
    settings = tasks.validate("text", **small("text", **extra))
    train, valid, test = text_task.document_files(settings, seed)
    assert len(valid) == len(test) == 1 and len(train) == 3
    assert sorted(train + valid + test) == sorted(folder.glob("*.txt"))
    assert text_task.document_files(settings, seed) == [train, valid, test]  # seeded
    data = build("text", seed, **extra)
    texts = {name: " ".join(p.read_text() for p in files)
             for name, files in (("train", train), ("validation", valid), ("test", test))}
    if tokenizer == "word":
        words_of = {n: set(text_task._words(text_task.read_paragraphs(f)))
                    for n, f in (("train", train), ("test", test))}
        vocab = text_task._word_ids(settings, text_task._words(text_task.read_paragraphs(train)))
        test_only = words_of["test"] - words_of["train"]
        assert test_only and not test_only & set(vocab)  # held-out markers are <unk>
        assert (data["test"][0] == 0).any()
    else:
        decode = (
            (lambda row: bytes(t if t < 256 else 32 for t in row).decode("utf-8", "replace"))
            if tokenizer == "byte"
            else (
                lambda row: text_task.bpe_tokenizer(settings, seed)
                .decode(row, skip_special_tokens=False)
                .replace("<eos>", " ")
            )
        )
        for split, (x, _) in data.items():
            for row in x[:10].tolist():
                words = [w for w in decode(row).split() if w.startswith("q")]
                assert all(w.strip(".") in texts[split] for w in words), (split, words)
    with pytest.raises(TaskError, match="at least 3 files") as err:
        tasks.validate("text", files=[str(train[0]), str(test[0])], split="document")
    assert "\n" not in str(err.value)
    with pytest.raises(TaskError, match="split must be one of region, document"):
        tasks.validate("text", split="chapter")


@pytest.mark.parametrize("extra", [{"tokenizer": "bpe"}, {"split": "document"}])
def test_text_too_little_text_is_one_line_for_bpe_and_documents(tmp_path, monkeypatch, extra):
    monkeypatch.setenv("MAD_SEARCH_CACHE", str(tmp_path / "cache"))
    for i in range(3):
        (tmp_path / f"t{i}.txt").write_text(f"just a few words here, file {i}.")
    with pytest.raises(TaskError, match="too few for seq_len=128") as err:
        tasks.build("text", files=str(tmp_path), cache=False, **extra)
    assert "\n" not in str(err.value)
