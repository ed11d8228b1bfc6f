"""The study's storage: URL checks and masking, SQLite pragmas, opening the database.

The coordinator is the only process that opens the storage. :class:`StudyStorage` checks a URL
at config time (before any worker starts) and opens it once: a server is connected to during the
check, so an unreachable one fails there; a local SQLite file is only checked then (its folder
can be made and written) and opened while the workers import, since importing the database layer
costs half a second.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import TYPE_CHECKING

from mad_search.errors import ConfigError

if TYPE_CHECKING:
    import optuna


# [scheme]://user:password@ : the password of a database URL anywhere in a text
_URL_PASSWORD = re.compile(r"((?:[A-Za-z][\w+.-]*)?://[^:/@\s'\"]*:)([^@\s'\"]+)(@)")


def scrub_passwords(text: str) -> str:
    """``text`` with the password of every database URL in it replaced by ***."""
    return _URL_PASSWORD.sub(r"\1***\3", text)


def mask_url(url: str) -> str:
    """The storage URL with any password replaced by ***."""
    try:
        from sqlalchemy.engine import make_url

        return make_url(url).render_as_string(hide_password=True)
    except Exception:
        return scrub_passwords(url)


def scrub_run_dir(run_dir: str | os.PathLike) -> list[Path]:
    """Mask database passwords in the files Hydra wrote into ``run_dir/.hydra`` (the
    overrides and the composed config name ``study.storage`` as typed); returns the files
    changed. Called before anything else runs, so no password stays on disk."""
    changed = []
    hydra_dir = Path(run_dir) / ".hydra"
    for path in sorted(hydra_dir.glob("*.yaml")) if hydra_dir.is_dir() else []:
        text = path.read_text()
        clean = scrub_passwords(text)
        if clean != text:
            path.write_text(clean)
            changed.append(path)
    return changed


def sqlite_file(url: str) -> Path | None:
    """The database file of a ``sqlite:///PATH`` URL (None for other URLs and in-memory)."""
    if not url.startswith("sqlite:///"):
        return None
    path = url[len("sqlite:///") :].split("?", 1)[0]
    return Path(path).expanduser() if path and path != ":memory:" else None


class StudyStorage:
    """A checked storage URL that is opened once, on first :meth:`open`."""

    def __init__(self, url: str, options: dict | None = None):
        if not isinstance(url, str) or "://" not in url:
            raise ConfigError(
                f"study.storage must be a database URL like sqlite:///outputs/mad_search.db "
                f"or postgresql://user:pass@host/db, got {mask_url(str(url))!r}"
            )
        self.url = url
        self.options = dict(options or {})  # RDBStorage keywords: heartbeat, retry callback
        self._opened: optuna.storages.BaseStorage | None = None
        if sqlite_file(url) is not None:
            _check_sqlite_path(url)  # a local file: checked now, opened later
        else:
            self.open()  # a server (or anything else): connect now, so an unreachable one fails

    @property
    def masked(self) -> str:
        return mask_url(self.url)

    @property
    def artifact_dir(self) -> Path:
        """Where the study's artifacts (the report's plots) are kept: beside a SQLite file
        (``<name>.artifacts/``), else ``outputs/artifacts`` under the current directory."""
        path = sqlite_file(self.url)
        return path.with_suffix(".artifacts") if path else Path("outputs") / "artifacts"

    @property
    def opened(self) -> bool:
        return self._opened is not None

    def open(self) -> optuna.storages.BaseStorage:
        if self._opened is None:
            self._opened = _open(self.url, self.options)
        return self._opened


def make_storage(url: str) -> optuna.storages.BaseStorage:
    """Check and open the study storage; one clear line, password masked, if it fails."""
    return StudyStorage(url).open()


def grpc_address(url: str) -> tuple[str, int] | None:
    """``(host, port)`` of a ``grpc://host:port`` URL (Optuna's gRPC storage proxy), else None."""
    m = re.fullmatch(r"grpc://([^:/]+):(\d+)/?", url)
    if url.startswith("grpc://") and not m:
        raise ConfigError(f"study.storage {url!r}: a proxy URL is grpc://HOST:PORT")
    return (m.group(1), int(m.group(2))) if m else None


def _open_grpc(url: str, address: tuple[str, int]) -> optuna.storages.BaseStorage:
    """A client of the gRPC storage proxy (``python -m mad_search.proxy``), checked with one
    call so that an unreachable proxy fails at config time. Heartbeats and retries are the
    proxy's storage's (the proxy process sets them up)."""
    import warnings

    import optuna

    host, port = address
    with warnings.catch_warnings():  # "experimental" in Optuna 5; the version is pinned
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        proxy = optuna.storages.GrpcStorageProxy(host=host, port=port)
    try:
        proxy.get_all_studies()
    except Exception as exc:
        reason = first_line(exc, cause=False)
        raise ConfigError(
            f"cannot reach the storage proxy at {url}: {reason} (start it with "
            f"python -m mad_search.proxy)"
        ) from None
    return proxy


def _open(url: str, options: dict | None = None) -> optuna.storages.BaseStorage:
    import warnings

    import optuna

    address = grpc_address(url)
    if address is not None:
        return _open_grpc(url, address)

    try:
        with warnings.catch_warnings():  # the heartbeat arguments are "experimental"
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            storage = optuna.storages.RDBStorage(
                url,
                engine_kwargs=_engine_options(url),
                **(options or {}),
            )
    except Exception as exc:  # unreachable host, bad driver, malformed URL...
        reason = first_line(exc, url, limit=300, cause=False)
        raise ConfigError(f"cannot open study storage {mask_url(url)}: {reason}") from None
    if sqlite_file(url) is not None:
        _sqlite_wal(storage)
    return storage


def _engine_options(url: str) -> dict | None:
    """SQLAlchemy engine options for a database server: connections checked before use (a
    restarted server's dead ones are replaced), and, for PostgreSQL, a connection attempt that
    gives up after 10 s, so that a host lost from the network costs the coordinator's loop (and
    the workers waiting for its answers) seconds, not the system's TCP timeout."""
    if url.startswith("sqlite"):
        return None
    options: dict = {"pool_pre_ping": True}
    if url.startswith("postgresql"):
        options["connect_args"] = {"connect_timeout": 10}
    return options


def _check_sqlite_path(url: str) -> None:
    """Create a SQLite file's folder and check the file can be written, without opening it
    (``sqlalchemy`` is not imported); ConfigError (one line) otherwise."""
    path = sqlite_file(url)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError):
        raise ConfigError(
            f"cannot open study storage {mask_url(url)}: a file is in the way of the folder "
            f"{path.parent}"
        ) from None
    except OSError as exc:
        raise ConfigError(
            f"cannot open study storage {mask_url(url)}: {exc.strerror}: {exc.filename}"
        ) from None
    target = path if path.exists() else path.parent
    if path.is_dir() or not os.access(target, os.R_OK | os.W_OK):
        why = "is a directory" if path.is_dir() else "is not writable"
        raise ConfigError(f"cannot open study storage {mask_url(url)}: {target} {why}")


def _sqlite_wal(storage: optuna.storages.RDBStorage) -> None:
    """Write-ahead logging for a SQLite study file, synced at checkpoints rather than at every
    commit. The coordinator writes about 30 user attributes per trial, each its own Optuna
    commit; with SQLite's default rollback journal each one waits for an fsync (measured here:
    5.3 ms each, 0.16 s per trial during which a freed worker waits for its next trial; 1.5 ms
    each with WAL). WAL also lets optuna-dashboard read the file while the coordinator writes. A
    crash can lose the last commits but never corrupts the file (SQLite's guarantee for WAL +
    synchronous=NORMAL)."""
    from sqlalchemy import event

    def on_connect(dbapi_connection, _record) -> None:
        cursor = dbapi_connection.cursor()
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute("PRAGMA synchronous=NORMAL")
        cursor.close()

    event.listen(storage.engine, "connect", on_connect)
    storage.engine.dispose()  # connections opened before the listener: reopen with it


class StorageLost(RuntimeError):
    """The storage stayed unreachable longer than ``study.outage_timeout``: the coordinator
    stopped (the message says what it saved and how to replay it)."""


# --- the database going away ----------------------------------------------------------------------


def is_unreachable(exc: BaseException) -> bool:
    """Whether ``exc`` (or an error it was raised from) says the storage cannot be reached right
    now (a dropped or refused connection, a server restarting, a locked SQLite file, a proxy not
    answering) rather than that a request was wrong. Optuna turns SQLAlchemy errors into
    ``StorageInternalError``, so the chain is followed."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, ConnectionError | TimeoutError):
            return True
        module = type(exc).__module__ or ""
        name = type(exc).__name__
        if module.startswith("sqlalchemy") and (
            name in ("OperationalError", "InterfaceError", "DisconnectionError", "TimeoutError")
            or getattr(exc, "connection_invalidated", False)
        ):
            return True
        if module.startswith("psycopg") and name in ("OperationalError", "InterfaceError"):
            return True
        if module.startswith("grpc") and hasattr(exc, "code"):
            try:
                code, details = exc.code().name, str(exc.details() or "")
            except Exception:
                code, details = "", ""
            if code in ("UNAVAILABLE", "DEADLINE_EXCEEDED"):  # the proxy is away
                return True
            # the proxy is up but its database is not: its call failed with a connection error
            if code == "UNKNOWN" and "OperationalError" in details:
                return True
        exc = exc.__cause__ or exc.__context__
    return False


def first_line(
    exc: BaseException, url: str | None = None, limit: int = 200, cause: bool = True
) -> str:
    """The first line of an error (with ``cause``, of the error it was raised from: Optuna
    wraps database errors), at most ``limit`` characters, passwords (and ``url``) masked."""
    inner = (exc.__cause__ or exc) if cause else exc
    text = (str(inner).strip().splitlines() or [type(inner).__name__])[0]
    text = scrub_passwords(text.replace(url, mask_url(url)) if url else text)
    return text[:limit]


class Outage:
    """Whether the storage is reachable, and when to try it again: back-off from ``first`` to
    ``longest`` seconds, doubling, for at most ``max_wait`` seconds (None: forever)."""

    def __init__(self, max_wait: float | None, first: float = 1.0, longest: float = 30.0):
        self.max_wait, self.first, self.longest = max_wait, first, longest
        self.since: float | None = None  # when the storage was first found unreachable
        self.delay = first
        self.next_try = 0.0
        self.reason = ""

    @property
    def down(self) -> bool:
        return self.since is not None

    def failed(self, reason: str, now: float) -> bool:
        """Record a failed storage call; True if it began the outage."""
        began = self.since is None
        if began:
            self.since, self.delay = now, self.first
        else:
            self.delay = min(self.delay * 2, self.longest)
        self.reason = reason
        self.next_try = now + self.delay
        return began

    def due(self, now: float) -> bool:
        return self.since is None or now >= self.next_try

    def expired(self, now: float) -> bool:
        if self.since is None or self.max_wait is None:
            return False
        return now - self.since > self.max_wait

    def recovered(self, now: float) -> float:
        """The storage answered again; returns how long it was away."""
        lasted = now - (self.since if self.since is not None else now)
        self.since, self.reason = None, ""
        return lasted
