"""One-model Hogwild against the serial run and synchronous data parallel (the analysis's Test 1),
and the staleness study (its Test 4).

    python -m mad_search.bench hogwild_train [workers=[1,2,4]] [max_steps=800] [files=PATH]
                                             [staleness_delays=[0,2,4,8,16,32]] [out=PATH]

One small xLSTM (``pattern``, ``d_model``) learns next-token prediction on a text corpus
(``files``; by default a corpus of ``paragraphs`` paragraphs written by the bundled corpus's
grammar into the cache, a few million bytes) with a byte-level BPE vocabulary (``vocab_size``).
Every run sees the same number of training examples (``max_steps`` x ``batch_size``) with the
same step-size recipe (constant with the Hogwild paper's back-off after a warm-up), and validates
every ``eval_every`` updates:

* ``serial``: one process using every core (``train.workers`` unset);
* ``hogwild_W``: one model, W workers of one thread each (``train.workers=W``), for each W in
  ``workers`` (W above the cores is run and marked oversubscribed);
* ``private_W``: the control, only the embedding shared and each worker its own blocks
  (``train.share=embedding``); the judged model is worker 0's;
* ``ddp_W``: synchronous data parallel on the same cores: W processes, ``torch.distributed`` with
  the gloo backend and ``DistributedDataParallel`` (gradient averaging), each rank a batch of
  ``batch_size`` per step, ``max_steps / W`` steps, for each W in ``ddp_workers``.

The target loss is the serial run's best validation loss times ``1 + target_margin``; each run's
time (wall seconds from the first step, validation included) and updates to the first validation
at or below it come from its learning curve. Reported: tokens/s, final (best) validation loss and
its distance from the serial run's (goal: within 2%), speedups over one Hogwild worker and over the
serial run, peak PSS of the run's processes (and per worker or rank beyond the first), and the
per-group staleness and collision rates Hogwild measured.

Staleness (Test 4): one worker with an injected delay tau (``staleness_delays``: each gradient is
written tau updates after the read it was computed from) trains until the target or
``staleness_max_steps``; updates to the target against tau, beside the Hogwild workers' measured
mean tau, and the bound of Niu et al.'s Proposition 4.1 relative to tau = 0,
``1 + 6 tau rho + 6 tau^2 Omega sqrt(Delta)``, with rho, Delta and Omega measured from the
embedding's updates (the dense blocks' rho = Delta = 1 and Omega = their size make it larger
still). A PNG (``bench_hogwild_train.png``) beside the JSON draws both experiments.
"""

from __future__ import annotations

import math
import os
import time
from pathlib import Path
from typing import Any

import torch

from mad_search.bench import BenchError
from mad_search.bench import _common as common

DEFAULTS: dict[str, Any] = {
    "pattern": "mlstm slstm",  # xLSTM[1:1] at depth 2
    "d_model": 64,
    "files": None,  # null: the grammar's corpus, ``paragraphs`` paragraphs, written to the cache
    "paragraphs": 24000,
    "vocab_size": 4096,
    "seq_len": 64,
    "num_train_examples": 20000,
    "num_valid_examples": 384,
    "batch_size": 16,
    "lr": 3e-3,
    "warmup_steps": 50,
    "backoff_steps": 400,
    "max_steps": 800,
    "eval_every": 50,
    "target_margin": 0.05,
    "workers": [1, 2, 4],
    "private_workers": [2],
    "ddp_workers": [1, 2],
    "staleness_delays": [0, 2, 4, 8, 16, 32],
    "staleness_max_steps": 1600,
    "seed": 0,
}


def run(**options: Any) -> dict:
    from mad_search.settings import available_cores

    opts = _validate(options)

    cores = available_cores()
    files = opts["files"] or str(_corpus(opts["paragraphs"]))
    from mad_search import tasks

    base = _plan(opts, files)
    t0 = time.perf_counter()
    data = tasks.as_tensors(tasks.build(base.task_name, seed=base.seed, **base.task_settings))
    corpus = _corpus_stats(files, base, time.perf_counter() - t0)
    common.note(f"hogwild_train: corpus {corpus['bytes'] / 1e6:.1f} MB, "
                f"{corpus['tokens'] / 1e6:.2f} M BPE tokens, vocab {base.task_info.vocab_size}")
    runs: dict[str, dict] = {}
    runs["serial"] = _measure("serial", lambda: _serial(base, data, cores))
    for w in opts["workers"]:
        runs[f"hogwild_{w}"] = _measure(f"hogwild {w}", lambda w=w: _hogwild(
            _plan(opts, files, workers=w), data))
    for w in opts["private_workers"]:
        runs[f"private_{w}"] = _measure(f"private {w}", lambda w=w: _hogwild(
            _plan(opts, files, workers=w, share="embedding"), data))
    for w in opts["ddp_workers"]:
        runs[f"ddp_{w}"] = _measure(f"ddp {w}", lambda w=w: _ddp(
            _plan(opts, files, max_steps=max(1, opts["max_steps"] // w)), data, w))
    target = runs["serial"]["best_val_loss"] * (1 + opts["target_margin"])
    _judge(runs, target, cores)
    staleness = _staleness(opts, files, data, target, runs)
    result = {
        "config": {**opts, "files": files},
        "machine": common.machine(),
        "corpus": corpus,
        "model": {"pattern": base.pattern, "d_model": base.d_model,
                  "params": sum(p.numel() for p in _model(base).parameters()),
                  "vocab_size": base.task_info.vocab_size},
        "target_loss": target,
        "runs": runs,
        "staleness": staleness,
    }
    return result


# --- the runs --------------------------------------------------------------------------------


def _plan(opts: dict, files: str, workers: int | None = None, share: str = "all",
          delay: int = 0, max_steps: int | None = None, target_loss: float | None = None):
    from mad_search.config import resolve

    train = {"max_steps": max_steps or opts["max_steps"], "batch_size": opts["batch_size"],
             "lr": opts["lr"], "warmup_steps": opts["warmup_steps"], "schedule": "backoff",
             "backoff_steps": opts["backoff_steps"], "eval_every": opts["eval_every"],
             "embedding_optimizer": "sparse_adam", "embedding_schedule": "backoff",
             "target_loss": target_loss, "progress": False, "seed": opts["seed"]}
    if workers is not None:
        train.update(workers=workers, share=share, delay=delay)
    cfg = {"task": {"name": "text", "files": files, "tokenizer": "bpe",
                    "vocab_size": opts["vocab_size"], "seq_len": opts["seq_len"],
                    "num_train_examples": opts["num_train_examples"],
                    "num_test_examples": opts["num_valid_examples"],
                    "num_valid_examples": opts["num_valid_examples"]},
           "model": {"d_model": opts["d_model"], "pattern": opts["pattern"],
                     "sparse_embedding": True},
           "seed": opts["seed"], "train": train}
    return resolve(cfg)


def _model(plan):
    from mad_search.model import build_model

    torch.manual_seed(plan.seed)
    return build_model(plan)


def _measure(label: str, fn) -> dict:
    common.note(f"hogwild_train: {label} ...")
    meter = common.PeakPss(lambda: [os.getpid()])
    meter.start()
    try:
        rec = fn()
    finally:
        mem = meter.stop()
    rec["peak_pss_mb"] = mem["peak_pss_mb"]
    rec["processes_at_peak"] = mem["processes_at_peak"]
    return rec


def _record(result, tokens: int, wall: float, **extra) -> dict:
    return {
        "wall_seconds": wall,
        "tokens": tokens,
        "tokens_per_s": tokens / max(wall, 1e-9),
        "best_val_loss": result.val_loss,
        "test_loss": result.test_loss,
        "steps": result.steps,
        "curve": [{"step": h["step"], "seconds": h["seconds"], "loss": h["loss"]}
                  for h in result.history],
        **extra,
    }


def _serial(plan, data, cores: int) -> dict:
    from mad_search.train import train_plan

    threads = torch.get_num_threads()
    torch.set_num_threads(cores)
    try:
        _, res = train_plan(plan, data)
    finally:
        torch.set_num_threads(threads)
    tokens = res.steps * plan.train.batch_size * plan.task_info.seq_len
    return _record(res, tokens, res.history[-1]["seconds"], threads=cores, processes=1)


def _hogwild(plan, data) -> dict:
    from mad_search.hogwild.one_model import train_hogwild

    _, run = train_hogwild(plan, data, threads=1)
    hog = run.hogwild
    return _record(run.result, hog["tokens"], hog["wall_seconds"], threads=1,
                   processes=plan.train.workers, hogwild=hog)


# --- synchronous data parallel: torch.distributed (gloo) + DistributedDataParallel -----------


def _ddp(plan, data, world: int) -> dict:
    import torch.multiprocessing as mp

    from mad_search.hogwild.one_model import _share_data

    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    port = common.free_port()
    shared = _share_data(data)
    procs = [ctx.Process(target=_ddp_rank, args=(rank, world, port, plan, shared, results))
             for rank in range(world)]
    for p in procs:
        p.start()
    out = None
    for _ in range(world):
        msg = results.get(timeout=3600)
        if msg[0] == "error":
            for p in procs:
                p.kill()
            raise BenchError(f"ddp rank failed: {msg[1]}")
        if msg[0] == "done":
            out = msg[1]
    for p in procs:
        p.join(timeout=60)
    return out


def _ddp_rank(rank: int, world: int, port: int, plan, data, results) -> None:
    import warnings

    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    from mad_search.train import (
        batch_order,
        evaluate,
        lm_metrics,
        loss_fn,
        lr_factor,
        make_optimizers,
        result_of,
    )

    # DDP's note that a convolution's gradient strides differ from its bucket's (speed only)
    warnings.filterwarnings("ignore", message="Grad strides do not match")
    try:
        torch.set_num_threads(1)
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                                world_size=world)
        cfg, info = plan.train, plan.task_info
        model = _model(plan)
        ddp = DistributedDataParallel(model)
        opt, emb_opt = make_optimizers(model, cfg)
        bases = [[g["lr"] for g in o.param_groups] for o in (opt, emb_opt)]
        batches = batch_order(data["train"], cfg.batch_size, cfg.seed + rank)
        history, tokens, loss = [], 0, None
        dist.barrier()
        t0 = time.perf_counter()
        for step in range(1, cfg.max_steps + 1):
            x, y = next(batches)
            # the step size follows the examples seen, as every other run's (W per step here)
            factor = lr_factor((step - 1) * world, cfg.schedule, cfg.max_steps * world,
                               cfg.warmup_steps, cfg.min_lr / cfg.lr, cfg.backoff_steps,
                               cfg.backoff_beta)
            for o, base in zip((opt, emb_opt), bases):
                for g, b in zip(o.param_groups, base):
                    g["lr"] = b * factor
            opt.zero_grad(set_to_none=True)
            emb_opt.zero_grad(set_to_none=True)
            loss = loss_fn(ddp(x), y)
            loss.backward()  # gradients averaged over the ranks here (all-reduce)
            torch.nn.utils.clip_grad_norm_([p for g in opt.param_groups for p in g["params"]
                                            if p.grad is not None], cfg.grad_clip)
            opt.step()
            emb_opt.step()
            tokens += x.numel()
            if rank == 0 and (step % max(1, cfg.eval_every // world) == 0
                              or step == cfg.max_steps):
                seconds = time.perf_counter() - t0
                m = lm_metrics(evaluate(model, *data["validation"], info.num_classes,
                                        cfg.eval_batch_size, cfg.accuracy))
                m.update(step=step * world, seconds=seconds, train_loss=float(loss.detach()))
                history.append(m)
        wall = time.perf_counter() - t0
        dist.barrier()
        if rank == 0:
            best = min(history, key=lambda m: m["loss"])
            test = lm_metrics(evaluate(model, *data["test"], info.num_classes,
                                       cfg.eval_batch_size, cfg.accuracy))
            res = result_of(best, test, steps=cfg.max_steps, best_step=best["step"],
                            tokens=tokens * world, seconds=wall, stopped="max_steps",
                            history=history, by_loss=True)
            results.put(("done", _record(res, tokens * world, wall, threads=1,
                                         processes=world)))
        else:
            results.put(("rank_done", rank))
        dist.destroy_process_group()
    except Exception as exc:  # noqa: BLE001 - reported to the parent
        results.put(("error", f"rank {rank}: {type(exc).__name__}: {exc}"))


# --- judging ---------------------------------------------------------------------------------


def _first_below(curve: list[dict], target: float) -> dict | None:
    return next((c for c in curve if c["loss"] <= target), None)


def _judge(runs: dict, target: float, cores: int) -> None:
    serial = runs["serial"]
    for rec in runs.values():
        hit = _first_below(rec["curve"], target)
        rec["seconds_to_target"] = hit["seconds"] if hit else None
        rec["updates_to_target"] = hit["step"] if hit else None
        rec["loss_vs_serial"] = rec["best_val_loss"] / serial["best_val_loss"] - 1
        rec["within_2pct_of_serial"] = abs(rec["loss_vs_serial"]) <= 0.02
        rec["oversubscribed"] = rec["processes"] * rec["threads"] > cores
    one = runs.get("hogwild_1")
    for rec in runs.values():
        rec["speedup_vs_serial"] = common.ratio(serial["seconds_to_target"],
                                                rec["seconds_to_target"])
        rec["speedup_vs_1_worker"] = common.ratio(one["seconds_to_target"],
                                                  rec["seconds_to_target"]) if one else None
        rec["tokens_per_s_vs_serial"] = rec["tokens_per_s"] / serial["tokens_per_s"]
    for prefix in ("hogwild", "private", "ddp"):
        first = runs.get(f"{prefix}_1") or runs.get("hogwild_1")
        for name, rec in runs.items():
            if name.startswith(prefix + "_") and first and rec["processes"] > 1:
                rec["pss_per_extra_process_mb"] = (
                    (rec["peak_pss_mb"] - first["peak_pss_mb"]) / (rec["processes"] - 1))


def _staleness(opts: dict, files: str, data: dict, target: float, runs: dict) -> dict:
    points = []
    for delay in opts["staleness_delays"]:
        plan = _plan(opts, files, workers=1, delay=delay, max_steps=opts["staleness_max_steps"],
                     target_loss=target)
        common.note(f"hogwild_train: staleness, delay {delay} ...")
        rec = _hogwild(plan, data)
        hog = rec["hogwild"]
        points.append({"source": "delay", "delay": delay, "workers": 1,
                       "tau_mean": hog["groups"]["blocks.0"]["tau_mean"],
                       "updates_to_target": hog["updates_to_target"],
                       "reached": hog["updates_to_target"] is not None,
                       "best_val_loss": rec["best_val_loss"]})
    for name, rec in runs.items():
        if name.startswith("hogwild_"):
            hit = _first_below(rec["curve"], target)
            points.append({"source": "workers", "delay": 0, "workers": rec["processes"],
                           "tau_mean": rec["hogwild"]["groups"]["blocks.0"]["tau_mean"],
                           "updates_to_target": hit["step"] if hit else None,
                           "reached": hit is not None, "best_val_loss": rec["best_val_loss"]})
    sparsity = _sparsity(runs, opts["d_model"])
    base = next((p["updates_to_target"] for p in points
                 if p["source"] == "delay" and p["delay"] == 0 and p["reached"]), None)
    for p in points:
        p["predicted_ratio"] = _bound(p["tau_mean"], sparsity)
        p["measured_ratio"] = (p["updates_to_target"] / base
                               if base and p["updates_to_target"] else None)
    return {"target_loss": target, "points": points, "sparsity": sparsity,
            "baseline_updates": base}


def _sparsity(runs: dict, d_model: int) -> dict:
    """rho, Delta and Omega of the embedding's updates, from the run with the most workers:
    Delta the largest share of updates that touched one row, Omega the coordinates an update
    writes (rows x width), rho the largest share of updates one update meets:
    at least Delta (every update that touches the most-touched row meets every other that does),
    so Delta is used for it, which only makes the bound smaller."""
    hog = [r["hogwild"] for n, r in runs.items() if n.startswith("hogwild_")]
    if not hog:
        return {}
    h = max(hog, key=lambda r: r["workers"])
    emb = h["groups"]["embedding"]
    delta = h["embedding_delta"] or 0.0
    rows = emb.get("rows_per_update", 0.0)
    return {"delta": delta, "rows_per_update": rows, "omega": rows * d_model, "rho": delta,
            "rows_ever_touched": h["embedding_rows_ever_touched"]}


def _bound(tau: float, s: dict) -> float | None:
    if not s:
        return None
    return 1 + 6 * tau * s["rho"] + 6 * tau**2 * s["omega"] * math.sqrt(s["delta"])


# --- corpus ----------------------------------------------------------------------------------


def _corpus(paragraphs: int) -> Path:
    from mad_search.tasks.cache import cache_dir
    from mad_search.tasks.data.make_corpus import write_corpus

    path = Path(cache_dir()) / "corpora" / f"grammar_{paragraphs}.txt"
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")  # whole file or none
        write_corpus(tmp, paragraphs=paragraphs, seed=7)
        os.replace(tmp, path)
    return path


def _corpus_stats(files: str, plan, seconds: float) -> dict:
    from mad_search.tasks.text import bpe_tokenizer, resolve_files

    paths = resolve_files(files)
    size = sum(p.stat().st_size for p in paths)
    tok = bpe_tokenizer(plan.task_settings, seed=plan.seed)
    sample = paths[0].read_text(encoding="utf-8")[:200_000]
    ratio = len(sample.encode()) / max(1, len(tok.encode(sample).ids))
    return {"files": [str(p) for p in paths], "bytes": size, "bytes_per_token": ratio,
            "tokens": int(size / ratio), "build_seconds": seconds}


# --- output ----------------------------------------------------------------------------------


def table(result: dict) -> str:
    m, c = result["model"], result["corpus"]
    lines = [
        f"hogwild_train (Test 1): {m['pattern']} at d_model {m['d_model']} ({m['params']:,} "
        f"parameters, vocab {m['vocab_size']}) on {c['bytes'] / 1e6:.1f} MB "
        f"(~{c['tokens'] / 1e6:.2f} M tokens); target validation loss "
        f"{result['target_loss']:.4f} (serial best x {1 + result['config']['target_margin']})",
        "",
    ]
    fmt = "{:<11} {:>5} {:>8} {:>9} {:>9} {:>9} {:>8} {:>8} {:>8} {:>8} {:>8} {:>9}"
    head = fmt.format("run", "procs", "tok/s", "s->target", "upd->tgt", "best val",
                      "vs ser.", "x serial", "x 1 wkr", "PSS MB", "+/proc", "staleness")
    lines += [head, "-" * len(head)]
    for name, r in result["runs"].items():
        stale = (r.get("hogwild") or {}).get("groups", {}).get("blocks.0", {})
        lines.append(fmt.format(
            name + ("*" if r["oversubscribed"] else ""), r["processes"],
            common.fmt(r["tokens_per_s"], ".0f"), common.fmt(r["seconds_to_target"], ".1f"),
            common.fmt(r["updates_to_target"], "d"), common.fmt(r["best_val_loss"], ".4f"),
            common.fmt(100 * r["loss_vs_serial"], "+.1f") + "%",
            common.fmt(r["speedup_vs_serial"], ".2f"), common.fmt(r["speedup_vs_1_worker"], ".2f"),
            common.fmt(r["peak_pss_mb"], ".0f"), common.fmt(r.get("pss_per_extra_process_mb"),
                                                            ".0f"),
            common.fmt(stale.get("staleness_mean"), ".2f")))
    lines.append("* more processes x threads than cores (oversubscribed)")
    s = result["staleness"]
    lines += ["", f"staleness (Test 4): updates to validation loss {s['target_loss']:.4f} against "
              f"tau; bound 1 + 6 tau rho + 6 tau^2 Omega sqrt(Delta) with rho "
              f"{s['sparsity'].get('rho', 0):.2f}, Delta {s['sparsity'].get('delta', 0):.2f}, "
              f"Omega {s['sparsity'].get('omega', 0):.0f} (embedding)"]
    fmt = "{:<8} {:>7} {:>7} {:>9} {:>12} {:>8} {:>10}"
    lines.append(fmt.format("run", "workers", "delay", "tau mean", "updates", "x tau=0",
                            "bound x"))
    for p in s["points"]:
        lines.append(fmt.format(p["source"], p["workers"], p["delay"], f"{p['tau_mean']:.2f}",
                                common.fmt(p["updates_to_target"], "d") if p["reached"]
                                else "not reached", common.fmt(p["measured_ratio"], ".2f"),
                                common.fmt(p["predicted_ratio"], ".3g")))
    return "\n".join(lines)


def plot(result: dict, path: Path) -> Path:
    """Time to target per run (left) and updates to target against tau (right)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.5))
    for name, r in result["runs"].items():
        curve = r["curve"]
        ax1.plot([c["seconds"] for c in curve], [c["loss"] for c in curve], label=name)
    ax1.axhline(result["target_loss"], color="grey", linestyle=":", label="target")
    ax1.set_ylim(0.9 * result["target_loss"], 3 * result["target_loss"])
    ax1.set_xlabel("wall seconds")
    ax1.set_ylabel("validation loss")
    ax1.set_title("Test 1: one model, serial vs Hogwild vs DDP")
    ax1.legend(fontsize=7)
    s = result["staleness"]
    pts = [p for p in s["points"] if p["source"] == "delay"]
    ax2.plot([p["tau_mean"] for p in pts if p["reached"]],
             [p["updates_to_target"] for p in pts if p["reached"]], "o-",
             label="measured: 1 worker, injected delay")
    miss = [p for p in pts if not p["reached"]]
    if miss:
        ax2.plot([p["tau_mean"] for p in miss], [result["config"]["staleness_max_steps"]] *
                 len(miss), "x", color="red", label="not reached within budget")
    wk = [p for p in s["points"] if p["source"] == "workers" and p["reached"]]
    ax2.plot([p["tau_mean"] for p in wk], [p["updates_to_target"] for p in wk], "s",
             label="measured: W workers (mean tau)")
    for p in wk:
        ax2.annotate(f"W={p['workers']}", (p["tau_mean"], p["updates_to_target"]),
                     textcoords="offset points", xytext=(6, -10), fontsize=7)
    if s["baseline_updates"]:
        taus = sorted({p["tau_mean"] for p in s["points"]} | {0.0})
        pred = [s["baseline_updates"] * (p or 1) for p in (_bound(t, s["sparsity"])
                                                            for t in taus)]
        ax2.plot(taus, pred, "--", color="black", label="Prop. 4.1 bound x updates(tau=0)")
        top = 3 * max(p["updates_to_target"] for p in s["points"] if p["reached"])
        ax2.set_ylim(0, top)
        sp = s["sparsity"]
        ax2.text(0.35, 0.55, f"bound with the embedding's rho={sp['rho']:.2f}, "
                 f"Delta={sp['delta']:.2f},\nOmega={sp['omega']:,.0f}: x{_bound(1, sp):.2g} "
                 "already at tau=1 (off the chart)", transform=ax2.transAxes, fontsize=7)
    ax2.set_xlabel("tau (updates between a read and its write)")
    ax2.set_ylabel("updates to target loss")
    ax2.set_title("Test 4: staleness")
    ax2.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _validate(opts: dict) -> dict:
    opts = dict(opts)
    for key in ("workers", "private_workers", "ddp_workers", "staleness_delays"):
        if not isinstance(opts[key], list) or not all(
                isinstance(v, int) and v >= (0 if key == "staleness_delays" else 1)
                for v in opts[key]):
            kind = "integers >= 0" if key == "staleness_delays" else "positive integers"
            raise BenchError(f"option {key} must be a list of {kind}, got {opts[key]!r}")
    common.check_at_least_one(opts, ("max_steps", "eval_every", "batch_size", "d_model",
                                     "seq_len", "staleness_max_steps", "paragraphs"))
    if not opts["target_margin"] >= 0:
        raise BenchError(f"option target_margin must be >= 0, got {opts['target_margin']}")
    return opts
