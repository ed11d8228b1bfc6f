"""Language modelling on local text files (``task=text``), read with ``datasets``' text loader.

Files: ``files`` is a path, a glob, a folder (its ``*.txt``) or a list of those; unset (null), it
is the small English corpus shipped in ``mad_search/tasks/data/`` (prose generated for this
project, see ``data/README.md``). Every file must exist and be non-empty. Files are read in
sorted order, split into paragraphs (blank-line separated, ``sample_by="paragraph"``), and each
paragraph becomes its tokens followed by ``<eos>``; all paragraphs form one token stream.

Tokenizers: ``byte`` (UTF-8 bytes 0..255, ``<eos>`` = 256, vocab_size fixed at 257), ``word``
(lower-cased words and single punctuation marks; ids 0 ``<unk>``, 1 ``<eos>``, then the
``vocab_size - 2`` most frequent words of the training region, ties broken alphabetically; no
padding is ever needed) or ``bpe`` (byte-level BPE, GPT-2 style, trained with Hugging Face
``tokenizers`` on the training region's text only: id 0 ``<eos>``, the 256 byte symbols, then
merges up to ``vocab_size`` (default 4096; fewer if the text has no more pairs to merge); every
text encodes without ``<unk>`` and decodes back exactly. The trained tokenizer is cached on disk
beside the task data, see :func:`bpe_tokenizer`).

Splits are contiguous regions of the stream, so they share no text: the last ``test_fraction``
of the tokens is test, the ``valid_fraction`` before it validation, the rest train (for ``bpe``
the fractions are of the characters, because the tokenizer must be trained before any text is
tokenized and may only see the training region). Contiguous regions of one corpus can differ in
topic (a book's last tenth is its ending): compare losses across corpora with care. Examples are
windows of ``seq_len + 1`` tokens: inputs the first ``seq_len``, targets the last ``seq_len``
(next-token prediction, every position scored). Training windows start at uniform random offsets
in the train region (seeded); validation and test windows are evenly spaced over their region
(overlapping when more are asked for than fit), so they do not depend on the seed.

``split=document`` instead gives whole files to the splits: a seeded shuffle of the files (at
least 3), ``test_fraction`` and ``valid_fraction`` of them (rounded, at least one each) for test
and validation, the rest for training; vocabularies come from the training files alone. Use it
where files are documents of one kind (articles, chapters), so that the splits share a topic mix.
"""

from __future__ import annotations

import glob
import os
import re
import tempfile
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from mad_search.tasks.cache import cache_dir, quiet_datasets
from mad_search.tasks.registry import register
from mad_search.tasks.task import Task, TaskInfo, as_float, as_int, check_sizes, fail

NAME = "text"
DATA_DIR = Path(__file__).resolve().parent / "data"
BYTE_VOCAB = 257  # 256 byte values + <eos>
DEFAULT_WORD_VOCAB = 2048
DEFAULT_BPE_VOCAB = 4096
BPE_ALPHABET = 256  # byte-level BPE starts from every byte value
TOKENIZERS = ("byte", "word", "bpe")
WORD = re.compile(r"\w+|[^\w\s]")
SPECIALS = ("<unk>", "<eos>")
EOS = "<eos>"

DEFAULTS = {
    "files": None,
    "tokenizer": "byte",
    "vocab_size": None,
    "seq_len": 128,
    "num_train_examples": 12_800,
    "num_test_examples": 1_280,
    "num_valid_examples": None,
    "test_fraction": 0.1,
    "valid_fraction": 0.1,
    "split": "region",
}
SPLITS = ("region", "document")


def resolve_files(files) -> list[Path]:
    """The files a ``files`` setting names, in order; TaskError if any is missing or empty."""
    if files is None:
        patterns = [str(DATA_DIR / "*.txt")]
    elif isinstance(files, (str, os.PathLike)):
        patterns = [os.fspath(files)]
    elif isinstance(files, Sequence):
        patterns = [os.fspath(f) for f in files]
    else:
        raise fail(NAME, f"files must be a path, a glob or a list of them, got {files!r}")
    if not patterns:
        raise fail(NAME, "files is an empty list; name at least one text file")
    found: list[Path] = []
    for pattern in patterns:
        pattern = os.path.expanduser(pattern)
        if glob.has_magic(pattern):
            matches = sorted(Path(p) for p in glob.glob(pattern, recursive=True))
            matches = [p for p in matches if p.is_file()]
            if not matches:
                raise fail(NAME, f"files: no file matches {pattern!r}")
        elif os.path.isdir(pattern):
            matches = sorted(Path(pattern).glob("*.txt"))
            if not matches:
                raise fail(NAME, f"files: folder {pattern!r} has no *.txt file")
        elif os.path.isfile(pattern):
            matches = [Path(pattern)]
        else:
            raise fail(NAME, f"files: {pattern!r} does not exist")
        for path in matches:
            path = path.resolve()
            if path.stat().st_size == 0:
                raise fail(NAME, f"files: {str(path)!r} is empty")
            if path not in found:
                found.append(path)
    return found


def _check(settings: dict) -> dict:
    check_sizes(NAME, settings)
    tokenizer = settings["tokenizer"]
    if tokenizer not in TOKENIZERS:
        raise fail(NAME, f"tokenizer must be one of {', '.join(TOKENIZERS)}, got {tokenizer!r}")
    if tokenizer == "byte":
        if settings["vocab_size"] not in (None, BYTE_VOCAB):
            raise fail(NAME, f"tokenizer byte has a fixed vocab_size of {BYTE_VOCAB} (256 bytes "
                             f"+ <eos>), got vocab_size={settings['vocab_size']!r}; leave it "
                             "unset or use tokenizer word")
        settings["vocab_size"] = BYTE_VOCAB
    elif tokenizer == "bpe":
        if settings["vocab_size"] is None:
            settings["vocab_size"] = DEFAULT_BPE_VOCAB
        as_int(NAME, settings, "vocab_size", minimum=BPE_ALPHABET + 1)  # the bytes and <eos>
    else:
        if settings["vocab_size"] is None:
            settings["vocab_size"] = DEFAULT_WORD_VOCAB
        as_int(NAME, settings, "vocab_size", minimum=len(SPECIALS) + 1)
    as_int(NAME, settings, "seq_len")
    test = as_float(NAME, settings, "test_fraction", 0.0, 1.0)
    valid = as_float(NAME, settings, "valid_fraction", 0.0, 1.0)
    if test == 0 or valid == 0 or test + valid >= 1:
        raise fail(NAME, f"test_fraction={test} and valid_fraction={valid} must be > 0 with a "
                         "sum below 1 (the rest is train)")
    files = resolve_files(settings["files"])
    settings["files"] = None if settings["files"] is None else [str(p) for p in files]
    if settings["split"] not in SPLITS:
        raise fail(NAME, f"split must be one of {', '.join(SPLITS)}, got {settings['split']!r}")
    if settings["split"] == "document":
        _document_counts(settings, len(files))
    return settings


def _document_counts(settings: dict, n_files: int) -> tuple[int, int, int]:
    """Files per split (train, validation, test) for ``split=document``: the fractions of the
    files, rounded, at least one each."""
    n_test = max(1, round(n_files * settings["test_fraction"]))
    n_valid = max(1, round(n_files * settings["valid_fraction"]))
    if n_files - n_test - n_valid < 1:
        raise fail(NAME, f"split=document gives whole files to train, validation and test, so it "
                         f"needs at least 3 files; got {n_files} (name a folder or a list of "
                         "files, or use split=region)")
    return n_files - n_valid - n_test, n_valid, n_test


def document_files(settings: dict, seed: int) -> list[list[Path]]:
    """``split=document``: the files of the train, validation and test splits, a seeded shuffle
    of the files cut by the fractions (whole files: no document is in two splits)."""
    files = resolve_files(settings["files"])
    counts = _document_counts(settings, len(files))
    order = np.random.default_rng(np.random.SeedSequence([seed, 1])).permutation(len(files))
    shuffled = [files[i] for i in order]
    return [shuffled[: counts[0]], shuffled[counts[0] : counts[0] + counts[1]],
            shuffled[counts[0] + counts[1] :]]


def _identity(settings: dict) -> list:
    """Which bytes the settings point at: every file's path, size and modification time."""
    return [[str(p), p.stat().st_size, p.stat().st_mtime_ns]
            for p in resolve_files(settings["files"])]


def read_paragraphs(paths: list[Path]) -> list[str]:
    """Non-empty paragraphs of the files, in order, through ``datasets``' text loader."""
    import datasets

    with quiet_datasets():
        loaded = datasets.load_dataset(
            "text", data_files=[str(p) for p in paths], sample_by="paragraph",
            split="train", cache_dir=str(cache_dir() / "hf"),
        )
    return [p.strip() for p in loaded["text"] if p.strip()]


def tokenize(settings: dict, paragraphs: list[str]) -> tuple[np.ndarray, int, int]:
    """The token stream and the sizes of its validation and test regions (at its end)."""
    if settings["tokenizer"] == "byte":
        stream = _byte_stream(paragraphs)
        valid, test = _regions(settings, len(stream))
        return stream, valid, test

    if settings["tokenizer"] == "bpe":
        return _bpe_stream(settings, paragraphs)

    words = _words(paragraphs)
    valid, test = _regions(settings, len(words))
    ids = _word_ids(settings, words[: len(words) - valid - test])
    stream = np.fromiter((ids.get(w, 0) for w in words), np.int32, len(words))
    return stream, valid, test


def _byte_stream(paragraphs: list[str]) -> np.ndarray:
    """UTF-8 bytes of each paragraph followed by ``<eos>`` (256)."""
    eos = np.array([BYTE_VOCAB - 1], np.int32)
    pieces = []
    for p in paragraphs:
        pieces += [np.frombuffer(p.encode("utf-8"), np.uint8).astype(np.int32), eos]
    return np.concatenate(pieces) if pieces else np.zeros(0, np.int32)


def _words(paragraphs: list[str]) -> list[str]:
    words: list[str] = []
    for p in paragraphs:
        words += WORD.findall(p.lower())
        words.append(SPECIALS[1])
    return words


def _word_ids(settings: dict, train_words: list[str]) -> dict[str, int]:
    """<unk>, <eos>, then the ``vocab_size - 2`` most frequent training words (ties by name)."""
    counts = Counter(train_words)
    counts.pop(SPECIALS[1], None)
    ranked = sorted(counts, key=lambda w: (-counts[w], w))[: settings["vocab_size"] - 2]
    return {w: i for i, w in enumerate(SPECIALS + tuple(ranked))}


def _character_regions(settings: dict, paragraphs: list[str]) -> list[list[tuple[str, bool]]]:
    """The paragraphs cut into train, validation and test text by character fractions: per
    region, its pieces ``(text, ends_paragraph)`` (a paragraph the cut falls in is split)."""
    total = sum(len(p) for p in paragraphs)
    cuts = [
        round(total * (1 - settings["valid_fraction"] - settings["test_fraction"])),
        round(total * (1 - settings["test_fraction"])),
    ]
    regions: list[list[tuple[str, bool]]] = [[], [], []]
    offset = 0
    for p in paragraphs:
        start = 0
        for r in range(3):
            lo = 0 if r == 0 else cuts[r - 1]
            hi = total if r == 2 else cuts[r]
            a, b = max(start, lo - offset), min(len(p), hi - offset)
            if a < b:
                regions[r].append((p[a:b], b == len(p)))
                start = b
        offset += len(p)
    return regions


def bpe_tokenizer(settings: dict, seed: int = 0, train_texts: list[str] | None = None):
    """The byte-level BPE tokenizer of the text task's settings (a ``tokenizers.Tokenizer``).

    Trained on the training split's text only (``train_texts``; read from the files when None)
    and cached as JSON under the task cache (``<cache>/bpe/<key>.json``, the key hashing the
    files' identity, ``vocab_size``, the split and its fractions, and for ``split=document`` the
    data ``seed``, which chooses the training files), so every run, worker and benchmark of the
    same corpus uses the same vocabulary; ``settings`` must be checked (``vocab_size`` set).
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    from mad_search.tasks.cache import cache_key

    keys = ("files", "vocab_size", "test_fraction", "valid_fraction", "split")
    pinned = {k: settings.get(k, DEFAULTS[k]) for k in keys}
    document = pinned["split"] == "document"
    key = cache_key("text-bpe", pinned, seed if document else 0, _identity(settings))
    path = cache_dir() / "bpe" / f"{key}.json"
    if path.is_file():
        return Tokenizer.from_file(str(path))
    if train_texts is None and document:
        train_texts = read_paragraphs(document_files(settings, seed)[0])
    elif train_texts is None:
        paragraphs = read_paragraphs(resolve_files(settings["files"]))
        train_texts = [text for text, _ in _character_regions(settings, paragraphs)[0]]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=settings["vocab_size"],
        special_tokens=[EOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(train_texts, trainer=trainer)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".json.tmp")
    os.close(fd)
    tok.save(tmp)
    os.replace(tmp, path)  # atomic: concurrent builders never read a half-written file
    return tok


def _bpe_ids(tok, pieces: list[tuple[str, bool]]) -> np.ndarray:
    """The BPE ids of text pieces ``(text, ends_paragraph)``, ``<eos>`` after each paragraph."""
    eos = tok.token_to_id(EOS)
    ids: list[int] = []
    encoded = tok.encode_batch([text for text, _ in pieces]) if pieces else []
    for (_, ends), enc in zip(pieces, encoded):
        ids += enc.ids
        if ends:
            ids.append(eos)
    return np.asarray(ids, np.int32)


def _bpe_stream(settings: dict, paragraphs: list[str]) -> tuple[np.ndarray, int, int]:
    regions = _character_regions(settings, paragraphs)
    tok = bpe_tokenizer(settings, train_texts=[text for text, _ in regions[0]])
    parts = [_bpe_ids(tok, pieces) for pieces in regions]
    _require_windows(settings, [len(p) for p in parts], "regions")
    return np.concatenate(parts), len(parts[1]), len(parts[2])


def _require_windows(settings: dict, sizes: list[int], what: str) -> None:
    """Each split (train, validation, test: ``sizes`` tokens) must hold one window."""
    if min(sizes) < settings["seq_len"] + 1:
        raise fail(NAME, f"the corpus's {what} hold {', '.join(map(str, sizes))} "
                         f"{settings['tokenizer']} tokens (train, validation, test), too few for "
                         f"seq_len={settings['seq_len']}: each split needs at least seq_len + 1 "
                         "tokens; add text, lower seq_len or raise the split fractions")


def _regions(settings: dict, total: int) -> tuple[int, int]:
    test = int(round(total * settings["test_fraction"]))
    valid = int(round(total * settings["valid_fraction"]))
    _require_windows(settings, [total - test - valid, valid, test], "regions")
    return valid, test


def _windows(stream: np.ndarray, starts: np.ndarray, seq_len: int):
    index = starts[:, None] + np.arange(seq_len)[None, :]
    return stream[index], stream[index + 1]


def _document_streams(settings: dict, seed: int) -> list[np.ndarray]:
    """``split=document``: one token stream per split from its own files; the word and BPE
    vocabularies come from the training files alone."""
    parts = [read_paragraphs(files) for files in document_files(settings, seed)]
    kind = settings["tokenizer"]
    if kind == "bpe":
        tok = bpe_tokenizer(settings, seed, train_texts=parts[0])
        streams = [_bpe_ids(tok, [(p, True) for p in ps]) for ps in parts]
    elif kind == "byte":
        streams = [_byte_stream(ps) for ps in parts]
    else:
        words = [_words(ps) for ps in parts]
        ids = _word_ids(settings, words[0])
        streams = [np.fromiter((ids.get(w, 0) for w in ws), np.int32, len(ws)) for ws in words]
    _require_windows(settings, [len(st) for st in streams], "documents")
    return streams


def _splits(settings: dict, seed: int) -> dict:
    seq_len = settings["seq_len"]
    if settings["split"] == "document":
        streams = _document_streams(settings, seed)
        stream = np.concatenate(streams)
        ends = np.cumsum([len(st) for st in streams])
        regions = {"train": (0, ends[0]), "validation": (ends[0], ends[1]),
                   "test": (ends[1], ends[2])}
    else:
        stream, n_valid, n_test = tokenize(
            settings, read_paragraphs(resolve_files(settings["files"])))
        train_end = len(stream) - n_valid - n_test
        regions = {"train": (0, train_end), "validation": (train_end, train_end + n_valid),
                   "test": (train_end + n_valid, len(stream))}
    rng = np.random.default_rng(np.random.SeedSequence(seed))
    out = {}
    for split, (lo, hi) in regions.items():
        span = hi - lo - (seq_len + 1)  # last valid start, relative to lo
        if split == "train":
            starts = rng.integers(0, span + 1, settings["num_train_examples"])
        else:
            count = settings["num_test_examples" if split == "test" else "num_valid_examples"]
            starts = np.linspace(0, span, count).round().astype(np.int64)
        out[split] = _windows(stream, lo + starts, seq_len)
    return out


@register(NAME, order=80)
def text() -> Task:
    """Language modelling on local text files."""
    return Task(
        name=NAME,
        defaults=DEFAULTS,
        check=_check,
        info=lambda s: TaskInfo(
            vocab_size=s["vocab_size"], seq_len=s["seq_len"], objective="loss",
            bytes_per_token=1.0 if s["tokenizer"] == "byte" else None,
        ),
        splits=_splits,
        identity=_identity,
    )
