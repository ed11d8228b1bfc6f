"""The run directory checked before Hydra writes into it.

Hydra creates ``hydra.run.dir`` and saves the composed config there before our code runs, so a
read-only or full file system would end in Hydra's traceback. :class:`RunDirCheck` (a Hydra
callback, registered in ``conf/config.yaml``) checks first and stops with one line.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from hydra.experimental.callback import Callback
from omegaconf import OmegaConf

MIN_FREE_BYTES = 1 << 20  # Hydra's files, the report and its plots need well under this


def run_dir_problem(path: str | os.PathLike, min_free: int = MIN_FREE_BYTES) -> str | None:
    """Why ``path`` cannot be made and written (None if it can): its nearest existing folder is
    read-only or not a folder, or its file system has less than ``min_free`` bytes free."""
    target = Path(path).absolute()
    ancestor = target
    while not ancestor.exists() and ancestor != ancestor.parent:
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        return f"cannot create the run directory {target}: {ancestor} is a file"
    stat = os.statvfs(ancestor)
    if not os.access(ancestor, os.W_OK | os.X_OK):
        why = "a read-only file system" if stat.f_flag & os.ST_RDONLY else "not writable"
        return f"cannot create the run directory {target}: {ancestor} is {why}"
    free = stat.f_bavail * stat.f_frsize
    if free < min_free:
        return (
            f"no space for the run directory {target}: {free // 1024} KiB free on its file "
            f"system (at least {min_free // 1024} KiB needed); free some or set hydra.run.dir"
        )
    return None


class RunDirCheck(Callback):
    """Stops a run whose run directory cannot be written, before Hydra tries (one line)."""

    def on_run_start(self, config, **kwargs) -> None:
        run_dir = OmegaConf.select(config, "hydra.run.dir")
        problem = run_dir_problem(run_dir) if run_dir else None
        if problem:
            print(f"error: {problem}", file=sys.stderr)
            sys.exit(2)
