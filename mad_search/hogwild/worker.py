"""A Hogwild worker process: trains the trials the coordinator hands it, one at a time.

Each trial builds its own blocks, norms and head (private to this process) and attaches the shared
embedding table of its task (:class:`~mad_search.hogwild.table.TableEmbedding`), through
:func:`mad_search.backend.train_plan` like every other run. Workers never open the Optuna storage:
everything goes through their pipe to the coordinator, in the messages of
:mod:`mad_search.hogwild.messages`.
"""

from __future__ import annotations

import os
import signal
import socket
import time
import traceback
from typing import Any

import torch

from mad_search.allocator import keep_freed_memory
from mad_search.hogwild.messages import Ready, Report, Stop, TrialEnd, TrialJob, Verdict
from mad_search.hogwild.table import NonFiniteUpdate, SharedTable, TableEmbedding


def table_key(task_name: str, settings: dict, d_model: int) -> str:
    """One shared table per task vocabulary and width."""
    import hashlib
    import json

    digest = hashlib.sha1(json.dumps([task_name, settings], sort_keys=True, default=str).encode())
    return f"{task_name}-{digest.hexdigest()[:8]}-d{d_model}"


def share_task_data(data: dict) -> dict:
    """``{split: (inputs, targets)}`` with every tensor moved to shared memory (in place): the
    coordinator builds a task's data once and every worker reads that one copy."""
    for pair in data.values():
        for t in pair:
            t.share_memory_()
    return data


def run_trial(job: TrialJob, slot: int, conn) -> tuple[str, dict]:
    """Train every task of ``job``; returns (status, result) with status done | pruned."""
    import blocks
    from mad_search.backend import train_plan
    from mad_search.train import Diverged, selects_by_loss

    hog = job.hogwild
    for module in job.block_modules:
        blocks.load_module(module)
    per_task, stats_all, pruned = [], [], False
    result: dict[str, Any] = {
        "slot": slot,
        "pid": os.getpid(),
        "host": socket.gethostname(),
        "device": hog.device,
        "backend": job.plans[0].backend,
        "tasks": per_task,
        "threads": torch.get_num_threads(),  # the most it trained with (lent threads included)
    }
    offset = 0
    for plan, key, data in zip(job.plans, job.table_keys, job.data):
        if hog.embedding == "shared":
            table, writer = job.tables[key], slot
        else:  # the control: a table of this trial's own, same initial weights
            info = plan.task_info
            table = SharedTable(
                info.vocab_size, plan.d_model, 1, seed=hog.seed, rule=hog.rule, share=False
            )
            writer = 0
        if plan.backend == "mlx":  # reads and writes the same table through a NumPy view
            from mad_search.mlx_train import MLXTableEmbedding

            emb = MLXTableEmbedding(table, writer, hog.lr, hog.max_nonfinite)
        else:
            emb = TableEmbedding(table, writer, hog.lr, hog.max_nonfinite)

        judged_by = "loss" if selects_by_loss(plan.train, plan.task_info) else "accuracy"

        def on_eval(step: int, metrics: dict, _off=offset, _key=judged_by, _plan=plan) -> bool:
            conn.send(Report(job.number, _off + step, float(metrics[_key])))
            verdict: Verdict = conn.recv()
            if verdict.threads and verdict.threads != torch.get_num_threads():
                set_threads(verdict.threads, _plan.backend)  # idle workers' threads, lent
                result["threads"] = max(result["threads"], verdict.threads)
            return verdict.prune

        try:
            model, res = train_plan(
                plan,
                data,
                embedding=emb,
                on_eval=on_eval,
                seed=(
                    plan.seed + job.number
                    if job.model_seed is None
                    else job.model_seed + plan.model_seed_offset
                ),
                device=hog.device,
                mlx_init="torch",  # a trial starts from the same weights on either backend
            )
        except (Diverged, NonFiniteUpdate) as exc:
            if not job.diverged_is_zero:
                raise
            stats_all.append(emb.stats.as_dict())
            per_task.append({**_diverged(plan, f"diverged: {exc}"), **stats_all[-1]})
            offset += plan.train.max_steps
            continue
        offset += plan.train.max_steps
        stats = emb.stats.as_dict()
        stats_all.append(stats)
        per_task.append(
            {
                "task": plan.task_name,
                "val_accuracy": res.val_accuracy,
                "test_accuracy": res.test_accuracy,
                "val_loss": res.val_loss,
                "test_loss": res.test_loss,
                # micro beside the configured (often macro) average: a macro gap between
                # splits can be one class predicted but never a target (README "Accuracy")
                "val_accuracy_micro": res.val_accuracy_micro,
                "test_accuracy_micro": res.test_accuracy_micro,
                "steps": res.steps,
                "tokens_per_s": res.tokens_per_s,
                "train_seconds": res.train_seconds,
                "stopped": res.stopped,
                "params": _params(model) + table.weight.numel(),
                "state_size": model.state_size(plan.task_info.seq_len),
                **stats,
            }
        )
        # Hogwild's split, checked rather than assumed: blocks private, table shared.
        result["shared_block_params"] = _shared_block_params(model)
        result["table_is_shared"] = bool(table.weight.is_shared())
        if res.stopped == "callback":
            pruned = True
            break
    n = len(per_task)
    result.update(
        val_accuracy=sum(t["val_accuracy"] for t in per_task) / n,
        test_accuracy=sum(t["test_accuracy"] for t in per_task) / n,
        val_loss=sum(t["val_loss"] for t in per_task) / n,
        test_loss=sum(t.get("test_loss", float("nan")) for t in per_task) / n,
        tokens_per_s=sum(t["tokens_per_s"] for t in per_task) / n,
        params=per_task[0]["params"],
        state_size=per_task[0]["state_size"],
        hogwild={k: sum(s[k] for s in stats_all) / n for k in stats_all[0]},
    )
    return ("pruned" if pruned else "done"), result


def _params(model) -> int:
    """Trainable parameters of a trial's model (torch or MLX), the shared table left out."""
    if hasattr(model, "num_params"):  # the MLX model
        return model.num_params()
    from mad_search.model import count_params

    return count_params(model)


def _shared_block_params(model) -> int:
    """Parameters of the trial's own model that sit in shared memory (0 when blocks are
    private, as Hogwild's split wants; an MLX model's arrays are always its own)."""
    if not hasattr(model, "named_parameters"):
        return 0
    return sum(p.numel() for p in model.parameters() if p.is_shared())


def _diverged(plan, reason: str) -> dict:
    """The per-task entry of a plan whose training diverged, scored 0 (``diverged_is_zero``)."""
    from mad_search.model import build_model, count_params

    model = build_model(plan)  # for its size: the diverged one is gone with the exception
    return {
        "task": plan.task_name,
        "val_accuracy": 0.0,
        "test_accuracy": 0.0,
        "val_accuracy_micro": 0.0,
        "test_accuracy_micro": 0.0,
        "val_loss": float("nan"),
        "steps": 0,
        "tokens_per_s": 0.0,
        "train_seconds": 0.0,
        "stopped": reason,
        "params": count_params(model) + plan.task_info.vocab_size * plan.d_model,
        "state_size": model.state_size(plan.task_info.seq_len),
    }


def set_threads(threads: int, backend: str = "torch") -> None:
    """Train with ``threads`` threads: torch's (the native kernels split their batch over as
    many), and OpenBLAS's for an MLX worker's matrix products."""
    torch.set_num_threads(threads)
    if backend == "mlx":
        from blocks.mlx import blas

        blas.set_threads(threads)


def worker_main(slot: int, conn, threads: int, backend: str = "torch") -> None:
    """Entry point of a spawned worker process (``backend`` torch or mlx)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the coordinator handles Ctrl-C for everyone
    keep_freed_memory()
    torch.set_num_interop_threads(1)
    if backend == "mlx":  # MLX's matrix products: OpenBLAS on Linux, this many threads
        import blocks.mlx  # noqa: F401
        import mad_search.mlx_train  # noqa: F401
    set_threads(threads, backend)
    # Import everything a trial needs before saying ready (the coordinator is still setting up
    # meanwhile), so the first trial does not pay for it.
    import blocks  # noqa: F401
    import mad_search.train  # noqa: F401
    from mad_search.train import Diverged

    conn.send(Ready(slot, os.getpid()))
    while True:
        try:
            job = conn.recv()
        except EOFError:
            return
        if isinstance(job, Stop):
            return
        t0 = time.perf_counter()
        set_threads(threads, backend)  # threads lent for the last trial go back
        try:
            status, result = run_trial(job, slot, conn)
            result["wall_seconds"] = time.perf_counter() - t0
            end = TrialEnd(job.number, status, result)
        except (Diverged, NonFiniteUpdate) as exc:
            end = TrialEnd(job.number, "failed", {"slot": slot}, f"diverged: {exc}")
        except Exception as exc:  # a broken trial must not take the worker down
            tb = traceback.format_exc(limit=3)
            result = {"slot": slot, "traceback": tb}
            end = TrialEnd(job.number, "failed", result, f"{type(exc).__name__}: {exc}")
        conn.send(end)
