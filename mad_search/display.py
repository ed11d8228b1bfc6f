"""The coordinator's live display on the terminal: trials done / running / pruned / failed, and
what each worker is doing. One line rewritten in place on a terminal; a status line every 30 s
(and every event) when the output is a file."""

from __future__ import annotations

import os
import sys
import time


class Progress:
    """Live display: trials done / running / pruned / failed, and each worker's trial."""

    def __init__(self, total: int, stream=None):
        self.total, self.stream = total, stream or sys.stdout  # the stdout of now, not of import
        self.counts = {"done": 0, "pruned": 0, "failed": 0}
        self.workers: dict[int, str] = {}
        self.tty = self.stream.isatty()
        self._last = 0.0

    def event(self, text: str) -> None:
        if self.tty:
            self.stream.write("\r\033[K")
        self.stream.write(text + "\n")
        self.status(force=True)

    def status(self, force: bool = False) -> None:
        now = time.time()
        if not force and now - self._last < (1.0 if self.tty else 30.0):
            return
        self._last = now
        finished = sum(self.counts.values())
        line = (
            f"trials {finished}/{self.total} finished (complete {self.counts['done']}, "
            f"pruned {self.counts['pruned']}, failed {self.counts['failed']}), "
            f"running {len(self.workers)}"
        )
        if self.workers:
            line += " | " + " | ".join(f"w{k}: {v}" for k, v in sorted(self.workers.items()))
        if self.tty:
            self.stream.write(
                "\r\033[K" + line[: os.get_terminal_size(self.stream.fileno()).columns - 1]
            )
        elif force:
            self.stream.write(line + "\n")
        self.stream.flush()
