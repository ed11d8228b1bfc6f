"""On-disk cache of built task datasets (``save_to_disk`` / ``load_from_disk``).

Location: ``$MAD_SEARCH_CACHE``, else ``~/.cache/mad_search/tasks``. An entry is the folder
``<task>-<key>``, where the key hashes the task name, its resolved settings, the seed, anything
else that pins the data (text files' sizes and times) and :data:`GENERATOR_VERSION` (raise it
whenever a generator's output changes). Writes are atomic: the dataset is saved into a temporary
folder beside the entry and renamed into place, so processes building the same task at once
never see a half-written entry; the first rename wins and the others keep their own copy.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import datasets

GENERATOR_VERSION = 1


def cache_dir() -> Path:
    """The cache root (not created until something is written)."""
    root = os.environ.get("MAD_SEARCH_CACHE") or Path.home() / ".cache" / "mad_search" / "tasks"
    return Path(root).expanduser()


def cache_key(name: str, settings: dict, seed: int, identity: Any = None) -> str:
    payload = {"task": name, "settings": settings, "seed": seed, "identity": identity,
               "version": GENERATOR_VERSION}
    text = json.dumps(payload, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:24]


@contextmanager
def quiet_datasets() -> Iterator[None]:
    """Hide ``datasets``' progress bars for the duration (restoring the caller's choice)."""
    from mad_search.tasks import load_datasets

    datasets = load_datasets()
    was_disabled = datasets.utils.are_progress_bars_disabled()
    datasets.utils.disable_progress_bars()
    try:
        yield
    finally:
        if not was_disabled:
            datasets.utils.enable_progress_bars()


def load_or_build(name: str, key: str,
                  make: Callable[[], datasets.DatasetDict]) -> datasets.DatasetDict:
    """The cached entry for ``key`` if there is a readable one, else ``make()``, then cached."""
    from mad_search.tasks import load_datasets

    datasets = load_datasets()
    root = cache_dir()
    entry = root / f"{name}-{key}"
    if entry.is_dir():
        try:
            with quiet_datasets():
                return datasets.load_from_disk(str(entry))
        except Exception:  # unreadable entry (e.g. files deleted by hand): rebuild it
            _discard(entry)
    data = make()
    try:
        root.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{entry.name}.", dir=root))
    except OSError as exc:
        warnings.warn(f"task cache {root} is not writable ({exc}); not caching", stacklevel=3)
        return data
    try:
        with quiet_datasets():
            data.save_to_disk(str(tmp))
        try:
            os.rename(tmp, entry)
        except OSError:
            pass  # another process put its (identical) entry there first
    except OSError as exc:
        warnings.warn(f"could not write task cache entry {entry} ({exc})", stacklevel=3)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return data


def _discard(entry: Path) -> None:
    """Move a broken entry out of the way (atomically), then delete it."""
    trash = Path(tempfile.mkdtemp(prefix=f".{entry.name}.broken.", dir=entry.parent))
    try:
        os.rename(entry, trash / "entry")
    except OSError:
        pass
    shutil.rmtree(trash, ignore_errors=True)
