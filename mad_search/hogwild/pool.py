"""The pool of spawned Hogwild workers, each with its own pipe to the coordinator.

Pipes (one per worker) rather than one shared queue: a worker killed mid-message cannot leave a
lock held that would freeze the others; its pipe just reports end-of-file and the coordinator
replaces it.
"""

from __future__ import annotations

import multiprocessing
from dataclasses import dataclass
from multiprocessing.connection import wait

import torch.multiprocessing  # noqa: F401  (registers torch's pickling of shared-memory tensors)

from mad_search.hogwild.messages import Stop, TrialJob
from mad_search.hogwild.worker import worker_main

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
    backend: str = "torch"  # torch | mlx: what this slot's worker trains with


class WorkerPool:
    """``workers`` spawned processes, ``threads`` threads each (torch's, or OpenBLAS's for an
    MLX worker: ``backends`` names each slot's backend, all torch by default). Shared tables and
    task data travel with each job (torch shares their memory; nothing is copied).

    Creating a pool returns at once: the workers import while the coordinator goes on setting up.
    """

    def __init__(self, workers: int, threads: int, backends: tuple[str, ...] = ()):
        self.ctx = multiprocessing.get_context("spawn")
        self.workers, self.threads = workers, threads
        self.slots = [Slot(i, backend=backends[i] if backends else "torch")
                      for i in range(workers)]
        self.restarts = 0
        for slot in self.slots:
            self._start(slot)

    def _start(self, slot: Slot) -> None:
        parent, child = self.ctx.Pipe(duplex=True)
        proc = self.ctx.Process(
            target=worker_main,
            name=f"mad-search-worker-{slot.index}",
            args=(slot.index, child, self.threads, slot.backend),
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

    def submit(self, slot: Slot, job: TrialJob) -> None:
        """Hand ``job`` to ``slot``'s worker. A worker that died since it last spoke is not an
        error here: the job stays on the slot, and the next :meth:`wait` reports the death, so
        the caller settles the job like any other killed trial."""
        slot.job = job
        self.send(slot, job)

    def send(self, slot: Slot, msg: object) -> bool:
        """Send ``msg`` to ``slot``'s worker; False if its pipe is closed (the worker died, and
        the next :meth:`wait` yields ``(slot, None)`` for it)."""
        try:
            slot.conn.send(msg)
        except OSError:  # BrokenPipeError, ConnectionResetError: the worker is gone
            return False
        return True

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
            self.send(slot, Stop())
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
