"""A throwaway PostgreSQL server of our own, for the faults benchmark and the tests: the same
PostgreSQL binaries as the machine's server, a new data folder and a free port, so that the
server can be stopped and started again (a real restart) without touching the server other
programs use. As root (as on our machines), the server runs as the ``postgres`` user, since
PostgreSQL refuses to run as root.
"""

from __future__ import annotations

import glob
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

from mad_search.bench._common import free_port


def bin_dir() -> Path | None:
    """Where ``initdb`` and ``pg_ctl`` are (PATH, else Debian's versioned folders)."""
    found = shutil.which("pg_ctl")
    if found and shutil.which("initdb"):
        return Path(found).parent
    folders = sorted(
        glob.glob("/usr/lib/postgresql/*/bin"), key=lambda p: int(p.split("/")[-2] or 0)
    )
    for folder in reversed(folders):
        if (Path(folder) / "initdb").exists() and (Path(folder) / "pg_ctl").exists():
            return Path(folder)
    return None


class PrivatePostgres:
    """``with PrivatePostgres() as pg: pg.url("db")``; ``pg.stop()`` / ``pg.start()``."""

    def __init__(self, root: str | os.PathLike | None = None):
        self.bin = bin_dir()
        if self.bin is None:
            raise RuntimeError("PostgreSQL's initdb and pg_ctl are not installed")
        self._tmp = None if root else tempfile.TemporaryDirectory(prefix="mad_pg_")
        self.root = Path(root or self._tmp.name)
        self.data = self.root / "data"
        self.port = free_port()
        self._as_user: list[str] = []
        if hasattr(os, "geteuid") and os.geteuid() == 0:
            shutil.chown(self.root, "postgres")
            os.chmod(self.root, 0o755)
            self._as_user = ["runuser", "-u", "postgres", "--"]
        self._pg(
            "initdb", "-D", str(self.data), "-A", "trust", "-U", "postgres", "--no-sync",
            "-E", "UTF8",
        )

    def _pg(self, tool: str, *args: str) -> None:
        proc = subprocess.run(
            [*self._as_user, str(self.bin / tool), *args],
            capture_output=True, text=True, timeout=120,
        )
        if proc.returncode != 0:
            raise RuntimeError(f"{tool} failed: {(proc.stderr or proc.stdout).strip()[:300]}")

    def start(self) -> None:
        options = (
            f"-p {self.port} -k {self.root} -c listen_addresses=127.0.0.1 -c fsync=off "
            "-c max_connections=100"
        )
        self._pg("pg_ctl", "-D", str(self.data), "-o", options, "-l", str(self.root / "log"),
                 "-w", "start")

    def stop(self, mode: str = "fast") -> None:
        """Stop the server (``fast``: every client connection is dropped; ``immediate``: as a
        crash)."""
        self._pg("pg_ctl", "-D", str(self.data), "-m", mode, "-w", "stop")

    def url(self, database: str = "postgres") -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/{database}"

    def create_database(self, name: str) -> str:
        import psycopg

        with psycopg.connect(self.url(), autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')
        return self.url(name)

    def close(self) -> None:
        try:
            self.stop("immediate")
        except RuntimeError:
            pass  # not running
        if self._tmp is not None:
            self._tmp.cleanup()

    def __enter__(self) -> PrivatePostgres:
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.close()
