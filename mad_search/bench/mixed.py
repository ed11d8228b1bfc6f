"""Mixed-backend benchmark (the analysis's Test 2): the same fixed trials through a torch-only, an
MLX-only and a mixed pool sharing one embedding table.

    python -m mad_search.bench mixed [trials=6] [max_steps=600] [workers=2] [out=PATH]

The trials are :mod:`mad_search.bench.scaling`'s kind: ``patterns`` (repeated up to ``trials``)
enqueued in order into a fresh SQLite study, no pruner, trial seed ``seed + trial number``, the
default study's task and sizes with ``max_steps`` steps (0: the default study's). Each trial starts
from the same weights on either backend (an MLX worker loads the torch model's initial weights for
its seed), reads the same batches and writes the same shared table with the same rule, so the
setups differ only in which backend computes. Setups, back to back, each with ``workers`` workers:
``torch`` (all torch), ``mlx`` (all MLX) and ``mixed`` (half and half; the odd one torch).

Reported per setup: wall time, trials per hour, mean validation accuracy, trials per backend, the
shared table's writes per worker (both kinds must have written it) and whether it is finite after
the run. ``mixed_vs_torch_accuracy`` is the mixed pool's mean accuracy minus the torch pool's (goal:
within 0.02). ``parity`` gives, for every block of the trials' patterns, the largest difference
between the torch block's output and its MLX twin's, given the same weights and a fresh input at the
default study's sizes.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

from mad_search.bench import BenchError
from mad_search.bench import _common as common

PATTERNS = [
    "mlstm*4",
    "(attention swiglu)*2",
    "mlstm*3 slstm",
    "mlstm attention",
    "(mlstm slstm)*2",
    "attention swiglu",
]

DEFAULTS: dict[str, Any] = {
    "trials": 6,
    "max_steps": 600,  # steps per trial (0: the default study's 1,500); 600 solves recall
    "workers": 2,
    "threads_per_worker": 1,
    "patterns": PATTERNS,
    "setups": ["torch", "mlx", "mixed"],
    "task_settings": {"num_test_examples": 256},
    "train": {},
    "seed": 0,
}

TARGET_ACCURACY_DIFF = 0.02


def run(**options: Any) -> dict:
    opts = _validate(options)
    try:
        import blocks.mlx  # noqa: F401
    except ImportError as exc:
        raise BenchError(f"bench mixed needs the mlx extra (pip install 'mad-search[mlx]'): "
                         f"{exc}") from None
    from blocks.mlx import blas

    patterns = common.trial_patterns(opts["patterns"], opts["trials"])
    common.check_patterns(patterns)
    base = common.compose_base()
    max_steps = opts["max_steps"] or int(base.train.max_steps)
    train = {"max_steps": max_steps, "eval_every": max_steps, **opts["train"]}
    out: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="mad-search-mixed-") as tmp:
        tmp = Path(tmp)
        for setup in opts["setups"]:
            cfg = common.compose_study_config(
                patterns=patterns, storage=f"sqlite:///{tmp}/{setup}.db",
                study_name=f"mixed-{setup}", workers=opts["workers"],
                threads_per_worker=opts["threads_per_worker"],
                task_settings=opts["task_settings"], train=train, seed=opts["seed"])
            OmegaConf.update(cfg, "hogwild.backends", _backends(setup, opts["workers"]),
                             merge=False)
            if setup == "torch":  # the same data cache for everyone, built outside the timing
                common.load_data(cfg)
            common.note(f"mixed: {setup} pool ({_backends(setup, opts['workers'])}) ...")
            rec = common.run_pool(cfg, tmp / setup)
            rec["backends"] = _backends(setup, opts["workers"])
            rec["trials_by_backend"] = _by_backend(cfg)
            out[setup] = rec
    torch_acc = (out.get("torch") or {}).get("mean_accuracy")
    mixed_acc = (out.get("mixed") or {}).get("mean_accuracy")
    diff = common.diff(mixed_acc, torch_acc)
    within = None if diff is None else abs(diff) <= TARGET_ACCURACY_DIFF
    return {
        "config": {**opts, "trial_patterns": patterns, "max_steps": max_steps},
        "machine": common.machine(),
        "blas": blas.status,
        "setups": out,
        "mixed_vs_torch_accuracy": diff,
        "met": {"accuracy_within_0.02": within},
        "parity": _parity(sorted({n for p in patterns for n in _layers(p)}), base),
    }


def _backends(setup: str, workers: int) -> dict[str, int]:
    if setup == "torch":
        return {"torch": workers}
    if setup == "mlx":
        return {"mlx": workers}
    return {"torch": workers - workers // 2, "mlx": workers // 2}


def _by_backend(cfg) -> dict[str, int]:
    import optuna

    study = optuna.load_study(study_name=cfg.study.name, storage=cfg.study.storage)
    counts: dict[str, int] = {}
    for t in study.get_trials(deepcopy=False):
        key = t.user_attrs.get("backend", "?")
        counts[key] = counts.get(key, 0) + 1
    return counts


def _layers(pattern: str) -> list[str]:
    from mad_search import spec

    return spec.parse(pattern)


def _parity(names: list[str], base) -> dict[str, dict]:
    """Largest |torch output - MLX twin output| per block, same weights, a fresh input at the
    default study's width, batch and length."""
    import mlx.core as mx
    import numpy as np
    import torch

    import blocks
    from mad_search.mlx_train import load_torch_state

    d, batch, seq = int(base.model.d_model), int(base.train.batch_size), int(base.task.seq_len)
    out = {}
    for name in names:
        tblock = blocks.build(name, d, seq)
        mblock = blocks.build(name, d, seq, backend="mlx")
        load_torch_state(mblock, tblock.state_dict())
        x = torch.randn(batch, seq, d)
        with torch.no_grad():
            want = tblock(x).numpy()
        got = np.array(mblock(mx.array(x.numpy())))
        err = float(np.abs(got - want).max())
        out[name] = {"max_abs_diff": err, "max_rel_diff": err / float(np.abs(want).max())}
    return out


def table(result: dict) -> str:
    cfg = result["config"]
    lines = [
        f"mixed benchmark (Test 2): {len(cfg['trial_patterns'])} fixed trials, {cfg['max_steps']} "
        f"steps each, {cfg['workers']} workers x {cfg['threads_per_worker']} thread(s); MLX BLAS: "
        f"{result['blas']}",
        "",
    ]
    fmt = "{:<7} {:<20} {:>8} {:>9} {:>9} {:<18} {:<16} {:>7}"
    head = fmt.format("setup", "workers", "wall s", "trials/h", "mean acc", "trials by backend",
                      "table writes", "finite")
    lines += [head, "-" * len(head)]
    for setup, rec in result["setups"].items():
        (table_,) = (rec.get("tables") or {"-": {}}).values()
        lines.append(fmt.format(
            setup, ", ".join(f"{k} {v}" for k, v in rec["backends"].items()),
            common.fmt(rec["wall_s"], ".1f"), common.fmt(rec["trials_per_hour"], ".0f"),
            common.fmt(rec["mean_accuracy"], ".4f"),
            ", ".join(f"{k} {v}" for k, v in rec["trials_by_backend"].items()),
            str(table_.get("writes_per_worker", "-")), str(table_.get("finite", "-"))))
    diff = result["mixed_vs_torch_accuracy"]
    lines += ["", f"mixed - torch mean accuracy: {common.fmt(diff, '+.4f')} (goal: within "
              f"{TARGET_ACCURACY_DIFF}) {common.verdict(result['met']['accuracy_within_0.02'])}",
              "", "torch block vs MLX twin, same weights and input (largest difference):"]
    for name, p in result["parity"].items():
        lines.append(f"  {name:<26} abs {p['max_abs_diff']:.2e}  rel {p['max_rel_diff']:.2e}")
    return "\n".join(lines)


def _validate(opts: dict) -> dict:
    opts = dict(opts)
    common.check_at_least_one(opts, ("trials", "threads_per_worker", "workers"))
    if opts["max_steps"] < 0:
        raise BenchError(f"option max_steps must be 0 or more, got {opts['max_steps']}")
    bad = [s for s in opts["setups"] if s not in ("torch", "mlx", "mixed")]
    if bad or not opts["setups"]:
        raise BenchError(f"option setups takes torch, mlx and mixed, got {opts['setups']}")
    if "mixed" in opts["setups"] and opts["workers"] < 2:
        raise BenchError("option workers must be at least 2 for the mixed setup")
    return opts
