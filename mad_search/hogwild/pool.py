"""The pool of spawned Hogwild workers, each with its own pipe to the coordinator.

Pipes (one per worker) rather than one shared queue: a worker killed mid-message cannot leave a
lock held that would freeze the others; its pipe just reports end-of-file and the coordinator
replaces it.
"""

from __future__ import annotations

import multiprocessing
import os
from dataclasses import dataclass, field
from multiprocessing.connection import wait
from typing import TYPE_CHECKING, Any

from mad_search.hogwild._entry import worker_entry

if TYPE_CHECKING:
    from mad_search.hogwild.worker import TrialJob

# A worker that dies before it ever says ready, this many times in a row on one slot, stops the
# study (an import error or a broken environment would otherwise restart it forever).
MAX_FAILED_STARTS = 3


class WorkerStartError(RuntimeError):
    """A worker process cannot start (it keeps dying before it is ready)."""


@dataclass
class Slot:
    index: int
    process: object = None
    conn: object = None
    job: TrialJob | None = None
    pid: int | None = None
    ready: bool = False
    failed_starts: int = 0  # consecutive deaths before "ready"
    started: float = 0.0
    info: dict = field(default_factory=dict)


class WorkerPool:
    """``workers`` spawned processes, ``threads`` torch threads each. Shared tables and task data
    travel with each job (torch shares their memory; nothing is copied).

    Creating a pool returns at once (it does not import torch here): the workers import while
    the coordinator goes on setting up.
    """

    def __init__(self, workers: int, threads: int):
        self.ctx = multiprocessing.get_context("spawn")
        self.workers, self.threads = workers, threads
        self.slots = [Slot(i) for i in range(workers)]
        self.restarts = 0
        for slot in self.slots:
            self._start(slot)

    def _start(self, slot: Slot) -> None:
        parent, child = self.ctx.Pipe(duplex=True)
        proc = self.ctx.Process(
            target=worker_entry,
            name=f"mad-search-worker-{slot.index}",
            args=(slot.index, child, self.threads),
            daemon=True,
        )
        proc.start()
        child.close()
        slot.process, slot.conn, slot.job, slot.ready, slot.pid = (
            proc,
            parent,
            None,
            False,
            proc.pid,
        )

    def restart(self, slot: Slot) -> None:
        """Replace a dead worker (its trial has already been settled by the caller); raises
        :class:`WorkerStartError` when the slot's worker keeps dying before it is ready."""
        slot.failed_starts = 0 if slot.ready else slot.failed_starts + 1
        if slot.failed_starts >= MAX_FAILED_STARTS:
            raise WorkerStartError(
                f"worker {slot.index} died {slot.failed_starts} times before it was ready (last "
                f"exit code {slot.process.exitcode}); run `python -c \"import "
                f"mad_search.hogwild.worker\"` in this environment to see why"
            )
        try:
            slot.conn.close()
        except OSError:
            pass
        slot.process.join(timeout=1)
        self.restarts += 1
        self._start(slot)

    def free_slots(self) -> list[Slot]:
        return [s for s in self.slots if s.ready and s.job is None]

    def busy(self) -> list[Slot]:
        return [s for s in self.slots if s.job is not None]

    def submit(self, slot: Slot, job: TrialJob) -> None:
        import torch.multiprocessing  # noqa: F401  (torch's pickling of shared-memory tensors)

        slot.job = job
        slot.conn.send(("job", job))

    def wait(self, timeout: float) -> list[tuple[Slot, object]]:
        """Messages that arrived (slot, message); a dead worker yields (slot, None)."""
        conns = {s.conn: s for s in self.slots}
        sentinels = {s.process.sentinel: s for s in self.slots}
        ready = wait(list(conns) + list(sentinels), timeout=timeout)
        out: list[tuple[Slot, object]] = []
        dead: set[int] = set()
        for obj in ready:
            if obj in conns:
                slot = conns[obj]
                try:
                    while slot.conn.poll():
                        out.append((slot, slot.conn.recv()))
                except (EOFError, OSError):
                    dead.add(slot.index)
            else:
                dead.add(sentinels[obj].index)
        for index in sorted(dead):
            slot = self.slots[index]
            if slot.process.is_alive():
                continue  # pipe hiccup without death: nothing to do
            out.append((slot, None))
        return out

    def close(self, timeout: float = 5.0) -> None:
        for slot in self.slots:
            try:
                slot.conn.send(("stop",))
            except (OSError, BrokenPipeError):
                pass
        for slot in self.slots:
            slot.process.join(timeout=timeout)
            if slot.process.is_alive():
                slot.process.terminate()
                slot.process.join(timeout=timeout)

    def kill_all(self) -> None:
        for slot in self.slots:
            if slot.process.is_alive():
                slot.process.kill()
        for slot in self.slots:
            slot.process.join(timeout=5)


def pool_shape(hogwild: dict[str, Any]) -> tuple[int, int]:
    """(workers, threads per worker) from ``hogwild`` settings; ``auto`` (or unset) means one
    worker per core and cores // workers threads each. Raises ValueError (one line)."""
    workers = hogwild.get("workers", "auto")
    workers = default_workers() if workers in ("auto", None) else workers
    if isinstance(workers, bool) or not isinstance(workers, int) or workers <= 0:
        raise ValueError(f"hogwild.workers must be a positive integer or auto, got {workers!r}")
    threads = hogwild.get("threads_per_worker", "auto")
    threads = max(1, default_workers() // workers) if threads in ("auto", None) else threads
    if isinstance(threads, bool) or not isinstance(threads, int) or threads <= 0:
        raise ValueError(
            f"hogwild.threads_per_worker must be a positive integer or auto, got {threads!r}"
        )
    return workers, threads


def default_workers() -> int:
    return max(
        1, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    )
