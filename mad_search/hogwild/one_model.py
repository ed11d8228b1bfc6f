"""Hogwild! training of ONE model (``train.workers=W``): W spawned workers, every parameter in
shared memory, updated in place without locks (Niu et al. 2011).

The parent builds the model from the plan's seed and moves every parameter into shared memory
(``share_memory_``); each worker gets the same tensors (no copy is made) and runs its own loop:

* its own data order (the serial run's order seeded ``train.seed + slot``: slot 0 draws exactly
  the serial run's batches) and its own optimiser state, as PyTorch's ``mnist_hogwild``: AdamW on
  the blocks, and on the embedding a sparse optimiser (``train.embedding_optimizer``: SparseAdam,
  SGD or Adagrad on sparse gradients, so a step writes only the rows its batch touched). Moments
  are per worker because shared moments would be one more dense tensor every step of every
  worker races on, and a worker's Adam moments describe the gradients it computed;
* the step size from the global clock (all workers' updates so far), so the schedule (cosine, or
  the paper's constant step with back-off) runs over the run's total updates, as in the serial
  run;
* the write: ``optimizer.step()`` adds the update into the shared tensors in place, with no lock;
  other workers may read half-written parameters (Hogwild's premise). Nothing non-finite is ever
  written: a step whose loss or gradients are non-finite is refused (AdamW's update from finite
  gradients and finite moments is finite), counted, and after ``train.max_nonfinite`` refusals of
  one worker the run stops with that reason.

Measured per parameter group (the embedding, each block, the final norm, the head): updates;
``tau``, the updates written to the group (by anyone) between the worker's read of it (the
moment its forward pass reaches the group) and its write; ``staleness``, the part of tau written
by OTHER workers; and the collision rate: for a dense group the fraction of writes with
staleness > 0, for the embedding the fraction of touched rows another worker wrote since the read.
``train.delay=d`` injects staleness: a worker applies each gradient d of its own steps after it
computed it (the staleness experiment).

Validation: the worker whose write moves the global clock past a multiple of ``eval_every`` copies
the shared weights (a snapshot), evaluates the copy and reports; the other workers keep training.
The best snapshot is kept in shared memory; at the end the parent restores it and evaluates the
test split, as the serial run does. ``train.share=embedding`` is the control regime: only the
embedding is shared, every worker trains private blocks, and slot 0's model is the one judged.
With one worker, the run equals the serial run with the same seed and optimisers (tested).
"""

from __future__ import annotations

import copy
import math
import os
import queue as queue_mod
import signal
import sys
import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch
import torch.multiprocessing as mp
from torch import nn

from mad_search.allocator import keep_freed_memory
from mad_search.model import aux_loss, build_model
from mad_search.train import (
    TorchSteps,
    TrainConfig,
    TrainResult,
    batch_order,
    evaluate,
    lm_metrics,
    loss_fn,
    lr_factor,
    result_of,
    selects_by_loss,
)

if TYPE_CHECKING:
    from mad_search.plan import RunPlan

SHARES = ("all", "embedding")


class HogwildFailed(RuntimeError):
    """A worker failed (non-finite updates refused too often, or an error); the reason is in the
    message. The last shared weights are checkpointed before it is raised."""


def group_of(name: str) -> str:
    """The parameter group of a parameter name: ``blocks.<i>`` for a block's parameters, else
    the top-level module (``embedding``, ``norm``, ``head``, ``decoder``...)."""
    parts = name.split(".")
    return ".".join(parts[:2]) if parts[0] == "blocks" and len(parts) > 2 else parts[0]


def parameter_groups(model: nn.Module) -> list[str]:
    """Group names in forward order (the order of the model's parameters)."""
    out: list[str] = []
    for name, _ in model.named_parameters():
        g = group_of(name)
        if g not in out:
            out.append(g)
    return out


class Counters:
    """Measurement counters in shared memory: ``writes`` (G, W) updates of each group by each
    slot (one writer per cell, so sums are exact clocks without atomics); ``steps`` (W,) updates
    per slot (the global clock is their sum); ``refused`` (W,); for the embedding's rows
    ``row_writer`` (V,) last writing slot, ``row_clock`` (V,) embedding clock at that write and
    ``row_touches`` (V,) updates that touched each row."""

    def __init__(self, groups: list[str], workers: int, vocab_size: int):
        self.groups = list(groups)
        self.writes = torch.zeros(len(groups), workers, dtype=torch.int64)
        self.steps = torch.zeros(workers, dtype=torch.int64)
        self.refused = torch.zeros(workers, dtype=torch.int64)
        self.row_writer = torch.full((vocab_size,), -1, dtype=torch.int32)
        self.row_clock = torch.zeros(vocab_size, dtype=torch.int64)
        self.row_touches = torch.zeros(vocab_size, dtype=torch.int64)
        for t in (self.writes, self.steps, self.refused, self.row_writer, self.row_clock,
                  self.row_touches):
            t.share_memory_()

    def clock(self) -> int:
        return int(self.steps.sum())


@dataclass
class GroupStats:
    """One worker's measurements of one parameter group."""

    updates: int = 0
    tau_sum: int = 0
    tau_max: int = 0
    stale_sum: int = 0
    stale_max: int = 0
    collided: int = 0  # writes with staleness > 0 (dense groups)
    rows: int = 0  # embedding: rows written
    collided_rows: int = 0  # embedding: rows another worker wrote since our read

    def add(self, other: GroupStats) -> None:
        for k in ("updates", "tau_sum", "stale_sum", "collided", "rows", "collided_rows"):
            setattr(self, k, getattr(self, k) + getattr(other, k))
        self.tau_max = max(self.tau_max, other.tau_max)
        self.stale_max = max(self.stale_max, other.stale_max)

    def summary(self, embedding: bool) -> dict:
        n = max(self.updates, 1)
        out = {
            "updates": self.updates,
            "tau_mean": self.tau_sum / n,
            "tau_max": self.tau_max,
            "staleness_mean": self.stale_sum / n,
            "staleness_max": self.stale_max,
        }
        if embedding:
            out["rows_per_update"] = self.rows / n
            out["collision_rate"] = self.collided_rows / max(self.rows, 1)
        else:
            out["collision_rate"] = self.collided / n
        return out


@dataclass
class _Read:
    """What a worker read: each group's clock (all writers) and its own writes then."""

    clocks: list[int]
    own: list[int]
    rows: torch.Tensor | None = None  # embedding rows the batch touched


@dataclass
class _Pending:
    """A computed gradient waiting to be written (``train.delay``)."""

    read: _Read
    grads: list[torch.Tensor | None]
    emb_grad: torch.Tensor | None


class HogwildSteps(TorchSteps):
    """A worker's steps: :class:`~mad_search.train.TorchSteps` with the reads and writes of each
    parameter group measured, non-finite steps refused instead of raised, and an optional delay
    between computing a gradient and writing it."""

    def __init__(self, model: nn.Module, cfg: TrainConfig, num_classes: int, counters: Counters,
                 slot: int):
        super().__init__(model, cfg, num_classes)
        self.counters, self.slot = counters, slot
        self.delay = cfg.delay
        self.stats = {g: GroupStats() for g in counters.groups}
        self.refusals = 0
        self.emb_index = counters.groups.index("embedding") if "embedding" in counters.groups \
            else None
        # train.share=embedding: every group but the embedding is this worker's own copy, so only
        # its own writes can come between its read and its write
        self.private = [cfg.share == "embedding" and gi != self.emb_index
                        for gi in range(len(counters.groups))]
        self.pending: deque[_Pending] = deque()
        self.params = [p for g in self.opt.param_groups for p in g["params"]]
        self.emb_params = [p for g in self.emb_opt.param_groups for p in g["params"]] \
            if self.emb_opt else []
        self._read: _Read | None = None
        self._hooks = []
        for gi, g in enumerate(counters.groups):
            module = model.get_submodule(g)
            self._hooks.append(module.register_forward_pre_hook(self._reader(gi)))

    def _reader(self, gi: int):
        def hook(module, args):
            if self._read is not None and module.training:
                row = self.counters.writes[gi]
                own = int(row[self.slot])
                self._read.clocks[gi] = own if self.private[gi] else int(row.sum())
                self._read.own[gi] = own
                if gi == self.emb_index and args and isinstance(args[0], torch.Tensor):
                    self._read.rows = torch.unique(args[0])
        return hook

    def refuse(self, why: str) -> None:
        self.refusals += 1
        self.counters.refused[self.slot] += 1
        if self.refusals > self.cfg.max_nonfinite:
            raise HogwildFailed(
                f"worker {self.slot}: {self.refusals} updates refused ({why}): they would have "
                "written non-finite values into the shared model"
            )

    def step(self, inputs, targets, factor, emb_factor, step):
        """Compute a gradient on the shared weights as they are now and write it (with
        ``train.delay``, write the one computed that many steps ago); returns the loss."""
        loss, pending = self.compute(inputs, targets, step)
        if pending is not None and self.delay:
            self.pending.append(pending)
            pending = self.pending.popleft() if len(self.pending) > self.delay else None
        if pending is not None:
            self.write(pending, factor, emb_factor)
        return loss

    def compute(self, inputs, targets, step) -> tuple[float, _Pending | None]:
        """Read (forward), backward and clip: the loss and the gradient to write, or None when
        the step is refused as non-finite."""
        model, opt, emb_opt = self.model, self.opt, self.emb_opt
        n = len(self.counters.groups)
        self._read = _Read([0] * n, [0] * n)
        try:
            loss = loss_fn(model(inputs), targets)
        finally:
            read, self._read = self._read, None
        aux = aux_loss(model)
        if aux is not None:
            loss = loss + aux
        if not torch.isfinite(loss):
            self.refuse(f"non-finite training loss at step {step}")
            return float(loss.detach()), None
        opt.zero_grad(set_to_none=True)
        if emb_opt:
            emb_opt.zero_grad(set_to_none=True)
        loss.backward()
        with_grad = [p for p in self.params if p.grad is not None]
        if self.cfg.grad_clip:
            norm = torch.nn.utils.clip_grad_norm_(with_grad, self.cfg.grad_clip, foreach=True)
        else:
            norm = torch.nn.utils.get_total_norm([p.grad for p in with_grad], foreach=True)
        emb_grad = self.emb_params[0].grad if self.emb_params else None
        emb_ok = emb_grad is None or bool(torch.isfinite(
            emb_grad.coalesce().values() if emb_grad.is_sparse else emb_grad).all())
        if not (torch.isfinite(norm) and emb_ok):
            self.refuse(f"non-finite gradient at step {step}")
            return float(loss.detach()), None
        return float(loss.detach()), _Pending(read, [p.grad for p in self.params], emb_grad)

    def write(self, pending: _Pending, factor: float, emb_factor: float) -> None:
        """Measure, then write the update of a computed gradient into the shared tensors
        (in place, lock-free) and count it."""
        c, slot, read = self.counters, self.slot, pending.read
        for p, g in zip(self.params, pending.grads):
            p.grad = g
        emb_grad = pending.emb_grad
        if self.emb_params:
            self.emb_params[0].grad = emb_grad
        before = c.writes.sum(dim=1)
        own = c.writes[:, slot]
        for gi, g in enumerate(c.groups):
            s = self.stats[g]
            tau = (int(own[gi]) if self.private[gi] else int(before[gi])) - read.clocks[gi]
            stale = tau - (int(own[gi]) - read.own[gi])
            s.updates += 1
            s.tau_sum += tau
            s.tau_max = max(s.tau_max, tau)
            s.stale_sum += stale
            s.stale_max = max(s.stale_max, stale)
            s.collided += stale > 0
        rows = None
        if self.emb_index is not None and emb_grad is not None:
            rows = (emb_grad.coalesce().indices()[0] if emb_grad.is_sparse
                    else read.rows if read.rows is not None else torch.zeros(0, dtype=torch.long))
            writer = c.row_writer.index_select(0, rows)
            since = c.row_clock.index_select(0, rows) >= read.clocks[self.emb_index]
            s = self.stats["embedding"]
            s.rows += rows.numel()
            s.collided_rows += int(((writer >= 0) & (writer != slot) & since).sum())
        # the write: in place into shared memory, no lock
        for g, base in zip(self.opt.param_groups, self.base_lrs):
            g["lr"] = base * factor
        self.opt.step()
        if self.emb_opt:
            for g, base in zip(self.emb_opt.param_groups, self.emb_base_lrs):
                g["lr"] = base * emb_factor
            self.emb_opt.step()
        if rows is not None:
            c.row_writer.index_fill_(0, rows, slot)
            c.row_clock.index_fill_(0, rows, int(before[self.emb_index]))
            c.row_touches.index_add_(0, rows, torch.ones_like(rows))
        c.writes[:, slot] += 1
        c.steps[slot] += 1


@dataclass
class _Shared:
    """What the parent hands every worker (tensors in shared memory, synchronisation objects)."""

    model: nn.Module
    data: dict
    counters: Counters
    best_state: dict
    stop: object  # mp.Event
    go: object  # mp.Event
    lock: object  # mp.Lock: evaluation bookkeeping only, never parameter updates
    next_eval: object  # mp.Value('q')
    best_score: object  # mp.Value('d')
    messages: object  # mp.Queue
    threads: int


def _loop(slot: int, plan: RunPlan, sh: _Shared) -> None:
    """One worker's training loop (runs in the spawned process)."""
    cfg = plan.train
    model = sh.model
    if cfg.share == "embedding":  # the control: private blocks, only the table shared
        for name, p in model.named_parameters():
            if group_of(name) != "embedding":
                p.data = p.data.clone()
    model.train()
    judged = cfg.share == "all" or slot == 0
    eval_model = copy.deepcopy(model) if judged else None  # private: a snapshot is evaluated
    steps = HogwildSteps(model, cfg, plan.task_info.num_classes, sh.counters, slot)
    by_loss = selects_by_loss(cfg, plan.task_info)
    bpt = getattr(plan.task_info, "bytes_per_token", None)
    batches = batch_order(sh.data["train"], cfg.batch_size, cfg.seed + slot)
    min_ratio = cfg.min_lr / cfg.lr

    def factor_of(schedule: str, step: int) -> float:
        return lr_factor(step, schedule, cfg.max_steps, cfg.warmup_steps, min_ratio,
                         cfg.backoff_steps, cfg.backoff_beta)

    own_steps, tokens, loss = 0, 0, float("nan")
    sh.messages.put(("ready", slot))
    sh.go.wait()
    t0 = time.perf_counter()
    while not sh.stop.is_set():
        clock = own_steps if cfg.share == "embedding" else sh.counters.clock()
        if clock >= cfg.max_steps:
            break
        x, y = next(batches)
        loss = steps.step(x, y, factor_of(cfg.schedule, clock),
                          factor_of(cfg.embedding_schedule, clock), clock + 1)
        own_steps += 1
        tokens += x.numel()
        if not judged:
            continue
        done = own_steps if cfg.share == "embedding" else sh.counters.clock()
        with sh.lock:  # claim a validation: the first write past each multiple of eval_every,
            claim = done >= sh.next_eval.value  # and the one that reaches max_steps
            if claim:
                nxt = (done // cfg.eval_every + 1) * cfg.eval_every
                sh.next_eval.value = min(nxt, cfg.max_steps) if done < cfg.max_steps else 2**62
        if not claim:
            continue
        snapshot = {k: v.detach().clone() for k, v in model.state_dict().items()}
        seconds = time.perf_counter() - t0
        eval_model.load_state_dict(snapshot)
        metrics = lm_metrics(evaluate(eval_model, *sh.data["validation"],
                                      plan.task_info.num_classes, cfg.eval_batch_size,
                                      cfg.accuracy), bpt)
        score = -metrics["loss"] if by_loss else metrics["accuracy"]
        with sh.lock:
            best = score > sh.best_score.value
            if best:
                sh.best_score.value = score
                for k, v in snapshot.items():
                    sh.best_state[k].copy_(v)
        metrics.update(step=done, train_loss=loss, seconds=seconds, slot=slot,
                       tokens_per_s=tokens / max(time.perf_counter() - t0, 1e-9))
        sh.messages.put(("eval", slot, metrics, best))
        reached = (metrics["loss"] <= cfg.target_loss if by_loss and cfg.target_loss is not None
                   else not by_loss and metrics["accuracy"] >= cfg.target_accuracy)
        if reached:
            sh.messages.put(("target", slot, done, seconds))
            sh.stop.set()
        if cfg.share == "embedding" and done >= cfg.max_steps:
            sh.stop.set()
    seconds = time.perf_counter() - t0
    sh.messages.put(("done", slot, {
        "steps": own_steps, "tokens": tokens, "seconds": seconds, "last_loss": loss,
        "groups": {g: s.__dict__.copy() for g, s in steps.stats.items()},
        "refused": steps.refusals}))


def _worker(slot: int, plan: RunPlan, sh: _Shared) -> None:
    """Spawn target: quiet Ctrl-C (the parent stops the run), one thread budget, the loop; an
    error is reported as one line and stops every worker."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    keep_freed_memory()
    torch.set_num_threads(sh.threads)
    try:
        _loop(slot, plan, sh)
    except HogwildFailed as exc:
        sh.messages.put(("failed", slot, str(exc)))
        sh.stop.set()
    except BaseException as exc:  # noqa: BLE001 - reported to the parent, which stops the run
        sh.messages.put(("failed", slot, f"worker {slot}: {type(exc).__name__}: {exc}"))
        sh.stop.set()


@dataclass
class HogwildRun:
    """What :func:`train_hogwild` returns beside the model: the usual result and the Hogwild
    measurements (``results.json``'s ``hogwild``)."""

    result: TrainResult
    hogwild: dict


def _share_data(data: dict) -> dict:
    out = {}
    for split, (x, y) in data.items():
        out[split] = (x.contiguous().share_memory_(), y.contiguous().share_memory_())
    return out


def shared_model(plan: RunPlan) -> nn.Module:
    """``plan``'s model, built from its seed as the serial run builds it, with every parameter
    and buffer moved into shared memory (what the workers are handed: the tensors, not copies)."""
    torch.manual_seed(plan.seed)
    model = build_model(plan)
    model.train()
    return model.share_memory()


def train_hogwild(plan: RunPlan, data: dict, out_dir: str | os.PathLike | None = None,
                  threads: int | None = None, log=print) -> tuple[nn.Module, HogwildRun]:
    """Train ``plan``'s model with ``plan.train.workers`` Hogwild workers; returns the model (the
    best validation checkpoint restored) and the run. ``threads``: torch threads per worker
    (default: the plan's ``threads``, else the cores divided among the workers). On Ctrl-C or a
    failed worker, every worker is stopped and the shared weights are saved to
    ``out_dir/checkpoint.pt`` (with the best snapshot as ``best.pt``) before the exception
    propagates."""
    from mad_search.settings import available_cores

    cfg = plan.train
    workers = cfg.workers
    cores = available_cores()
    if workers > cores:
        print(f"warning: train.workers={workers} is more than the {cores} cores here: the "
              "workers will share cores (oversubscription)", file=sys.stderr)
    threads = threads or plan.threads or max(1, cores // workers)
    model = shared_model(plan)
    groups = parameter_groups(model)
    counters = Counters(groups, workers, plan.task_info.vocab_size)
    best_state = {k: v.detach().clone().share_memory_() for k, v in model.state_dict().items()}
    ctx = mp.get_context("spawn")
    sh = _Shared(model=model, data=_share_data(data), counters=counters, best_state=best_state,
                 stop=ctx.Event(), go=ctx.Event(), lock=ctx.Lock(),
                 next_eval=ctx.Value("q", min(cfg.eval_every, cfg.max_steps)),
                 best_score=ctx.Value("d", -math.inf), messages=ctx.Queue(), threads=threads)
    procs = [ctx.Process(target=_worker, args=(slot, plan, sh), daemon=True,
                         name=f"hogwild-{slot}") for slot in range(workers)]
    history: list[dict] = []
    done: dict[int, dict] = {}
    failure: str | None = None
    target: tuple[int, float] | None = None
    t_start = None
    try:
        for p in procs:
            p.start()
        ready = 0
        while ready < workers:
            msg = _get(sh.messages, procs)
            if msg[0] == "ready":
                ready += 1
            elif msg[0] == "failed":
                raise HogwildFailed(msg[2])
        sh.go.set()
        t_start = time.perf_counter()
        while len(done) < workers:
            msg = _get(sh.messages, procs)
            kind = msg[0]
            if kind == "eval":
                metrics = msg[2]
                history.append(metrics)
                if cfg.progress:
                    log(f"update {metrics['step']}: val_loss {metrics['loss']:.4f} "
                        f"val_acc {metrics['accuracy']:.4f} ({metrics['seconds']:.1f} s)")
            elif kind == "target":
                target = (msg[2], msg[3])
            elif kind == "failed":
                failure = failure or msg[2]
                sh.stop.set()
            elif kind == "done":
                done[msg[1]] = msg[2]
        wall = time.perf_counter() - t_start
        for p in procs:
            p.join(timeout=30)
        if failure:
            raise HogwildFailed(failure)
    except BaseException:
        sh.stop.set()
        for p in procs:
            if p.pid is None:  # never started
                continue
            p.join(timeout=30)
            if p.is_alive():
                p.terminate()
        if out_dir is not None and _checkpoint(model, best_state, out_dir):
            print(f"one-model Hogwild stopped: the shared model's last weights are in "
                  f"{Path(out_dir) / 'checkpoint.pt'} (best validation: best.pt)", file=sys.stderr)
        raise
    total = counters.clock()
    by_loss = selects_by_loss(cfg, plan.task_info)
    bpt = getattr(plan.task_info, "bytes_per_token", None)
    nc = plan.task_info.num_classes
    history.sort(key=lambda m: m["step"])
    if cfg.share == "all" and (not history or history[-1]["step"] < total) and target is None:
        # the run's last update was not validated: validate the final shared weights
        metrics = lm_metrics(evaluate(model, *data["validation"], nc, cfg.eval_batch_size,
                                      cfg.accuracy), bpt)
        last = max(done.values(), key=lambda d: d["steps"])
        metrics.update(step=total, train_loss=last["last_loss"], seconds=wall, slot=-1,
                       tokens_per_s=sum(d["tokens"] for d in done.values()) / wall)
        history.append(metrics)
        score = -metrics["loss"] if by_loss else metrics["accuracy"]
        if score > sh.best_score.value:
            sh.best_score.value = score
            for k, v in model.state_dict().items():
                best_state[k].copy_(v)
    best = max(history, key=lambda m: -m["loss"] if by_loss else m["accuracy"]) if history \
        else None
    model.load_state_dict(best_state)
    test = lm_metrics(evaluate(model, *data["test"], nc, cfg.eval_batch_size, cfg.accuracy), bpt)
    tokens = sum(d["tokens"] for d in done.values())
    steps_judged = total if cfg.share == "all" else done[0]["steps"]
    if target is not None:
        stopped = "target_loss" if by_loss else "target_accuracy"
    else:
        stopped = "max_steps"
    result = result_of(best, test, steps=steps_judged, best_step=best["step"] if best else 0,
                       tokens=tokens, seconds=wall, stopped=stopped, history=history,
                       by_loss=by_loss)
    return model, HogwildRun(result, _summary(plan, counters, done, threads, wall, target))


def _get(messages, procs, poll: float = 0.5):
    """The next message; a worker that died without a word (killed) fails the run."""
    while True:
        try:
            return messages.get(timeout=poll)
        except queue_mod.Empty:
            dead = [p for p in procs if p.exitcode not in (None, 0)]
            if dead:
                raise HogwildFailed(f"worker {dead[0].name} died (exit code {dead[0].exitcode})") \
                    from None


def _summary(plan: RunPlan, counters: Counters, done: dict, threads: int, wall: float,
             target: tuple[int, float] | None) -> dict:
    cfg = plan.train
    groups = {}
    for g in counters.groups:
        total = GroupStats()
        for d in done.values():
            total.add(GroupStats(**d["groups"][g]))
        groups[g] = total.summary(embedding=g == "embedding")
    updates = counters.clock()
    touches = counters.row_touches
    return {
        "workers": cfg.workers,
        "share": cfg.share,
        "delay": cfg.delay,
        "threads_per_worker": threads,
        "updates": updates,
        "updates_per_worker": [int(v) for v in counters.steps],
        "tokens": sum(d["tokens"] for d in done.values()),
        "wall_seconds": wall,
        "updates_to_target": target[0] if target else None,
        "seconds_to_target": target[1] if target else None,
        "refused_nonfinite": int(counters.refused.sum()),
        "embedding_delta": float(touches.max()) / max(int(counters.writes[0].sum()), 1)
        if counters.groups and counters.groups[0] == "embedding" else None,
        "embedding_rows_ever_touched": int((touches > 0).sum()),
        "groups": groups,
    }


def _checkpoint(model: nn.Module, best_state: dict, out_dir: str | os.PathLike) -> bool:
    """Save the shared weights as they are and the best snapshot; False if it could not."""
    out = Path(out_dir)
    try:
        out.mkdir(parents=True, exist_ok=True)
        torch.save({k: v.detach().clone() for k, v in model.state_dict().items()},
                   out / "checkpoint.pt")
        torch.save({k: v.clone() for k, v in best_state.items()}, out / "best.pt")
    except OSError:
        return False
    return True
