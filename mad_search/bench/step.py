"""Where a training step's time goes: per pattern, ms per step and its profile by kind of work.

    python -m mad_search.bench step [patterns=[...]] [steps=20] [warmup=5] [threads=1]
        [task=NAME] [d_model=N] [batch_size=N] [top=N] [out=PATH]

Each pattern is built at the default study's sizes (``+sweep=layer_patterns``: its width, task,
batch and learning rate), or with ``task=`` at that MAD task's baseline setting (``conf/task``,
the difficulty grid's baseline; width and batch then default to ``conf/config.yaml``'s), and
with ``d_model=`` / ``batch_size=`` at another width or batch (``task=selective_copying
d_model=64 batch_size=64`` is the ``quick`` protocol level's largest run). It is trained with
:func:`mad_search.train.train_step`, the step every run and worker takes (forward, loss,
backward, gradient clipping, AdamW), under the workers' allocator setting
(:mod:`mad_search.allocator`), on batches of the task's training split. After ``warmup``
untimed steps, ``steps`` timed steps give the median ms
per step; then ``steps`` more run under ``torch.profiler``, whose self CPU time per operator is
split into:

* ``matmul``: matrix products (mm, bmm, addmm, baddbmm, ...);
* ``conv``: convolutions, forward and backward;
* ``attention``: PyTorch's fused attention kernels (scaled_dot_product_attention; where the C
  attention kernel runs, its time is under ``native``);
* ``elementwise``: every other arithmetic operator (pointwise maths, norms, reductions, scans);
* ``copies``: copies and layout changes (copy_, cat, stack, clone, pad, index, fill);
* ``optimiser``: the fused AdamW step and the foreach gradient clipping;
* ``native``: the C kernels of ``blocks/csrc`` (selective scan, sLSTM scan and projections,
  mLSTM cells, gates and output gate, attention, gated linear units, causal and headwise
  convolutions), forward and backward (see README "Native kernels");
* ``other``: what no operator accounts for: Python, autograd's engine, dispatch, views.

``ms`` columns are the shares times the unprofiled median (the profiler itself slows a step).
``top=N`` also lists each pattern's N operators with the most self CPU time (ms per step of the
profiled run).
"""

from __future__ import annotations

import statistics
import time
from typing import Any

import torch

from mad_search.bench import BenchError
from mad_search.bench import _common as common

PATTERNS = [
    "mlstm*4",
    "mlstm*7 slstm",
    "slstm*4",
    "(attention swiglu)*2",
    "(mamba swiglu)*2",
    "(gated_linear_attention swiglu)*2",
    "(hyena swiglu)*2",
]

DEFAULTS: dict[str, Any] = {
    "patterns": PATTERNS,
    "steps": 20,
    "warmup": 5,
    "threads": 1,  # torch threads; a pool worker runs with 1
    "seed": 0,
    "task": "",  # a MAD task at its baseline setting; "" = the default study's task
    "d_model": 0,  # 0 = the default study's width (with task=: conf/config.yaml's)
    "batch_size": 0,  # 0 = the default study's batch (with task=: conf/config.yaml's)
    "top": 0,  # operators listed per pattern, by self CPU time
}

KINDS = ("matmul", "conv", "attention", "elementwise", "copies", "optimiser", "native", "other")

_MATMUL = {"mm", "bmm", "addmm", "baddbmm", "addbmm", "matmul", "linear", "dot", "mv", "addmv"}
_COPIES = {
    "copy_",
    "cat",
    "stack",
    "clone",
    "contiguous",
    "_to_copy",
    "to",
    "pad",
    "constant_pad_nd",
    "index",
    "index_select",
    "gather",
    "fill_",
    "zero_",
    "zeros",
    "zeros_like",
    "new_zeros",
    "ones",
    "full",
    "empty",
    "empty_like",
    "empty_strided",
    "new_empty",
    "new_empty_strided",
    "resize_",
    "flip",
    "repeat",
    "masked_fill",
    "masked_fill_",
}
_VIEWS = {
    "view",
    "_unsafe_view",
    "reshape",
    "transpose",
    "permute",
    "t",
    "expand",
    "as_strided",
    "select",
    "slice",
    "unsqueeze",
    "squeeze",
    "unbind",
    "split",
    "split_with_sizes",
    "chunk",
    "narrow",
    "detach",
    "alias",
    "unflatten",
    "flatten",
    "lift_fresh",
    "result_type",
    "is_nonzero",
    "item",
    "_local_scalar_dense",
    "view_as",
    "expand_as",
    "numpy_T",
}


def kind_of(name: str) -> str:
    """The kind of work of a profiler event, by its name (see the module docstring)."""
    if name.startswith("_Native"):
        return "native"  # the C kernels of blocks/csrc (their autograd functions, both ways)
    if not name.startswith("aten::"):
        return "other"  # autograd nodes, custom functions' Python, record_function ranges
    op = name[len("aten::") :]
    if op.startswith(("_fused_adam", "_foreach_")):
        return "optimiser"
    if op in _MATMUL:
        return "matmul"
    if "conv" in op:
        return "conv"
    if "scaled_dot_product" in op:
        return "attention"
    if op in _COPIES:
        return "copies"
    if op in _VIEWS:
        return "other"
    return "elementwise"


def run(**options: Any) -> dict:
    """Time and profile every pattern's training step; return the JSON result."""
    opts = _validate(options)
    common.check_patterns(opts["patterns"])
    from mad_search.allocator import keep_freed_memory

    keep_freed_memory()  # as every training process does: large blocks stay in the heap
    # a task is taken at its baseline setting, without the default study's resizing of it
    base = common.compose_base(None, opts["task"]) if opts["task"] else common.compose_base()
    if opts["d_model"]:
        base.model.d_model = opts["d_model"]
    if opts["batch_size"]:
        base.train.batch_size = opts["batch_size"]
    data = common.load_data(base)
    previous = torch.get_num_threads()
    torch.set_num_threads(opts["threads"])
    try:
        rows = []
        for pattern in opts["patterns"]:
            common.note(f"{pattern}: {opts['warmup']} + {opts['steps']} steps, then profiled")
            rows.append(_one(base, data, pattern, opts))
    finally:
        torch.set_num_threads(previous)
    return {
        "config": {
            **opts,
            "d_model": int(base.model.d_model),
            "batch_size": int(base.train.batch_size),
            "seq_len": int(data["train"][0].shape[1]),
            "task": str(base.task.name),
        },
        "machine": common.machine(),
        "kinds": list(KINDS),
        "rows": rows,
    }


def _one(base, data: dict, pattern: str, opts: dict) -> dict:
    from omegaconf import OmegaConf

    from mad_search.model import build_model, count_params
    from mad_search.spec import parse
    from mad_search.sweep import plans_for
    from mad_search.train import make_optimizers, train_step

    task_cfgs = [dict(OmegaConf.to_container(base.task, resolve=True))]
    plan = plans_for(base, task_cfgs, {"model.pattern": parse(pattern, check=False)})[0]
    torch.manual_seed(opts["seed"])
    model = build_model(plan).train()
    opt, emb_opt = make_optimizers(model, plan.train)
    x_train, y_train = data["train"]
    gen = torch.Generator().manual_seed(opts["seed"])
    batch = plan.train.batch_size

    def step(i: int) -> None:
        idx = torch.randint(0, x_train.shape[0], (batch,), generator=gen)
        train_step(model, opt, emb_opt, x_train[idx], y_train[idx], plan.train.grad_clip, i)

    for i in range(opts["warmup"]):
        step(i)
    times = []
    for i in range(opts["steps"]):
        start = time.perf_counter()
        step(i)
        times.append(time.perf_counter() - start)
    ms = 1000 * statistics.median(times)

    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        start = time.perf_counter()
        for i in range(opts["steps"]):
            step(i)
        profiled = time.perf_counter() - start
    by_kind = dict.fromkeys(KINDS, 0.0)
    for event in prof.key_averages():
        by_kind[kind_of(event.key)] += event.self_cpu_time_total / 1e6
    # what the operators do not account for (Python, autograd, dispatch) is "other"
    by_kind["other"] += max(0.0, profiled - sum(by_kind.values()))
    total = sum(by_kind.values())
    shares = {k: v / total for k, v in by_kind.items()}
    top = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)
    return {
        "pattern": pattern,
        "layers": list(plan.layers),
        "params": count_params(model),
        "ms_per_step": ms,
        "ms_min": 1000 * min(times),
        "tokens_per_s": batch * x_train.shape[1] / (ms / 1000),
        "share": shares,
        "ms": {k: shares[k] * ms for k in KINDS},
        "profiled_ms_per_step": 1000 * profiled / opts["steps"],
        "top": [
            {"op": e.key, "kind": kind_of(e.key), "calls": e.count // opts["steps"],
             "ms": e.self_cpu_time_total / 1000 / opts["steps"]}
            for e in top[: opts["top"]]
        ],
    }


def table(result: dict) -> str:
    cfg = result["config"]
    head = (
        f"step benchmark: training step at {cfg['task']}'s size (d_model "
        f"{cfg['d_model']}, batch {cfg['batch_size']}, {cfg['seq_len']} positions), "
        f"{cfg['threads']} thread(s), median of {cfg['steps']} steps; shares of the profiled "
        "self CPU time, in ms of the unprofiled step"
    )
    width = max([22] + [len(r["pattern"]) for r in result["rows"]])
    fmt = "{:<" + str(width) + "} {:>8} {:>10}" + " {:>11}" * len(KINDS)
    lines = [head, "", fmt.format("pattern", "ms/step", "tokens/s", *KINDS)]
    lines.append("-" * len(lines[-1]))
    for r in result["rows"]:
        cells = [f"{r['ms'][k]:.1f} ({100 * r['share'][k]:.0f}%)" for k in KINDS]
        lines.append(
            fmt.format(r["pattern"], f"{r['ms_per_step']:.1f}", f"{r['tokens_per_s']:,.0f}", *cells)
        )
    for r in result["rows"]:
        if r.get("top"):
            lines += ["", f"{r['pattern']}: operators by self CPU time (profiled ms per step)"]
            lines += [f"  {t['ms']:8.2f}  {t['calls']:5d} calls  {t['kind']:<11} {t['op']}"
                      for t in r["top"]]
    return "\n".join(lines)


def _validate(opts: dict) -> dict:
    common.check_at_least_one(opts, ("steps", "threads"))
    for key in ("warmup", "d_model", "batch_size", "top"):
        if opts[key] < 0:
            raise BenchError(f"option {key} must be 0 or more, got {opts[key]}")
    if opts["task"]:
        from mad_search.tasks.grid import load_grid

        names = list(load_grid()["tasks"])
        if opts["task"] not in names:
            raise BenchError(f"option task must be one of {', '.join(names)}, got {opts['task']!r}")
    if not opts["patterns"]:
        raise BenchError("option patterns must name at least one layer sequence")
    return dict(opts)
