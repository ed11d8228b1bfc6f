"""Blocks benchmark: forward+backward throughput of every registered block, float32, CPU.

    python -m mad_search.bench blocks [seq_lens=[128,256]] [iters=9] [threads=2]
        [study_size=true] [out=PATH]

Sizes: with ``study_size`` (the default), first the default study's (``+sweep=layer_patterns``:
its width, batch and input length, where a study spends its time), then ``d_model`` and
``batch`` at each of ``seq_lens`` (mad-lab's width 128 by default, where the official xLSTM
blocks are timed too). For each size: build every block, run ``warmup`` untimed forward+backward
rounds on one (batch, seq_len, d_model) input, then ``iters`` timed rounds in which the blocks
take turns
(so a burst of load from other processes hits them alike); report the median as tokens/s and
ms/iter (and the minimum), with the block's parameter count and ``state_size(seq_len)``. The
input requires grad, as it would inside a stack. On a loaded machine prefer ``threads=1``:
multi-threaded kernels slow down far more than single-threaded ones when cores are contended.

In the same rounds, the official xLSTM package's mLSTM block (pure-PyTorch parallel backend) and
sLSTM block (``vanilla`` backend) are timed at the same sizes; ``ratio_vs_official`` is
ours / official tokens/s (above 1: ours is faster).
"""

from __future__ import annotations

import inspect
import os
import platform
import statistics
import sys
import time
from typing import Any

import torch
from torch import nn

from mad_search.bench import BenchError, _official_xlstm, compose_config
from mad_search.settings import available_cores

DEFAULTS: dict[str, Any] = {
    "d_model": 128,
    "num_heads": 4,  # passed to blocks whose constructor takes num_heads
    "conv_kernel": 4,  # likewise (mLSTM, sLSTM), and to the official blocks
    "batch": 16,
    "seq_lens": [128, 256],
    "warmup": 2,
    "iters": 9,  # timed iterations; the median is reported
    "threads": 0,  # torch.set_num_threads; 0 = every core this process may use
    "blocks": [],  # block names to time; empty = every registered block
    "block_options": {},  # extra constructor options per block, e.g. {mlstm: {cell: parallel}}
    "official": True,  # also time the official xlstm blocks, where installed
    "study_size": True,  # also time every block at the default study's width, batch and length
    "seed": 0,
}

OFFICIAL_PREFIX = "official_xlstm."


def run(**options: Any) -> dict:
    """Time every requested block (and the official xLSTM blocks); return the JSON result."""
    opts = _validate(options)
    library = _block_library()
    names = _block_names(library, opts["blocks"])
    _check_block_options(opts["block_options"], names)
    official_ok, official_status = (
        _official_xlstm.status() if opts["official"] else (False, "disabled (official=false)")
    )
    official_names = [n for n in _official_xlstm.NAMES if n in names] if official_ok else []

    previous_threads = torch.get_num_threads()
    threads = opts["threads"] or available_cores()
    torch.set_num_threads(threads)
    sizes = [(opts, seq_len, official_names) for seq_len in opts["seq_lens"]]
    if opts["study_size"]:
        study = _study_size()
        sizes.insert(0, ({**opts, **study}, study["seq_len"], []))
    try:
        rows = []
        for size_opts, seq_len, official in sizes:
            entries = [_build_ours(library, name, seq_len, size_opts) for name in names]
            entries += [_build_official(name, seq_len, size_opts) for name in official]
            print(
                f"timing {len(entries)} blocks at d_model {size_opts['d_model']}, batch "
                f"{size_opts['batch']}, seq_len {seq_len}: "
                f"{opts['warmup']} + {opts['iters']} rounds ...",
                file=sys.stderr,
                flush=True,
            )
            rows += _measure(entries, seq_len, size_opts)
    finally:
        torch.set_num_threads(previous_threads)

    return {
        "config": {**opts, "threads": threads, "dtype": "float32", "device": "cpu"},
        "machine": _machine(threads),
        "official": official_status,
        "rows": rows,
        "ratio_vs_official": _ratios(rows) if official_ok else None,
    }


def table(result: dict) -> str:
    """The result as a fixed-width table, one line per (sequence length, block)."""
    cfg, machine = result["config"], result["machine"]
    ratios = result.get("ratio_vs_official") or {}
    head = (
        f"blocks benchmark: forward+backward, float32, CPU, heads {cfg['num_heads']}, "
        f"conv {cfg['conv_kernel']}, median of {cfg['iters']} "
        f"(warmup {cfg['warmup']}), {cfg['threads']} threads, torch {machine['torch']}"
    )
    lines = [head, f"official: {result['official']}", ""]
    cols = ("block", "d_model", "batch", "seq_len", "tokens/s", "ms/iter", "min ms", "params")
    cols += ("state_size", "ours/official")
    width = max([22] + [len(row["block"]) for row in result["rows"]])
    fmt = "{:<" + str(width) + "} {:>7} {:>5} {:>7} {:>10} {:>9} {:>9} {:>9} {:>11} {:>13}"
    lines.append(fmt.format(*cols))
    lines.append("-" * len(fmt.format(*cols)))
    for row in result["rows"]:
        ratio = None
        if row["d_model"] == cfg["d_model"] and row["batch"] == cfg["batch"]:
            ratio = ratios.get(row["block"], {}).get(str(row["seq_len"]))
        state = row["state_size"]
        lines.append(
            fmt.format(
                row["block"],
                row["d_model"],
                row["batch"],
                row["seq_len"],
                f"{row['tokens_per_s']:,.0f}",
                f"{row['ms_per_iter']:.1f}",
                f"{row['ms_min']:.1f}",
                f"{row['params']:,}",
                "-" if state is None else f"{state:,}",
                "" if ratio is None else f"{ratio:.2f}x",
            )
        )
    return "\n".join(lines)


# --- measuring -----------------------------------------------------------------------------


def time_rounds(
    modules: list[nn.Module], x: torch.Tensor, warmup: int, iters: int
) -> list[list[float]]:
    """Seconds per forward+backward pass (``y.sum().backward()``) of each module.

    Modules take turns, one pass each per round (the starting module rotates), so a burst of
    load from other processes hits every module alike and the ratios stay fair.
    """
    times: list[list[float]] = [[] for _ in modules]
    for module in modules:
        module.train()
    for r in range(warmup + iters):
        order = [(r + j) % len(modules) for j in range(len(modules))]
        for i in order:
            elapsed = _one_pass(modules[i], x)
            if r >= warmup:
                times[i].append(elapsed)
    return times


def _one_pass(module: nn.Module, x: torch.Tensor) -> float:
    module.zero_grad(set_to_none=True)
    x.grad = None
    start = time.perf_counter()
    y = module(x)
    y.sum().backward()
    elapsed = time.perf_counter() - start
    if y.shape != x.shape or y.dtype != torch.float32:
        raise RuntimeError(
            f"expected a float32 {tuple(x.shape)} output, got {y.dtype} {tuple(y.shape)}"
        )
    return elapsed


def _measure(entries: list[dict], seq_len: int, opts: dict) -> list[dict]:
    """Time the built blocks of one sequence length together; one result row per block."""
    torch.manual_seed(opts["seed"] + seq_len)
    x = torch.randn(opts["batch"], seq_len, opts["d_model"], requires_grad=True)
    modules = [entry.pop("module") for entry in entries]
    all_times = time_rounds(modules, x, opts["warmup"], opts["iters"])
    rows = []
    for entry, module, times in zip(entries, modules, all_times):
        median = statistics.median(times)
        rows.append(
            {
                "block": entry.pop("block"),
                "d_model": opts["d_model"],
                "batch": opts["batch"],
                "seq_len": seq_len,
                "tokens_per_s": opts["batch"] * seq_len / median,
                "ms_per_iter": 1000 * median,
                "ms_min": 1000 * min(times),
                "params": sum(p.numel() for p in module.parameters() if p.requires_grad),
                **entry,
            }
        )
    return rows


def _build_ours(library, name: str, seq_len: int, opts: dict) -> dict:
    wanted = {"num_heads": opts["num_heads"], "conv_kernel": opts["conv_kernel"]}
    kwargs = {**_accepted(library.get(name), wanted), **opts["block_options"].get(name, {})}
    torch.manual_seed(opts["seed"])
    try:
        module = library.build(name, opts["d_model"], seq_len, **kwargs)
    except ValueError as exc:  # blocks.BlockError: e.g. d_model not divisible by num_heads
        raise BenchError(f"{exc} (d_model {opts['d_model']})") from None
    state = module.state_size(seq_len) if hasattr(module, "state_size") else None
    if hasattr(module, "cell_for"):  # blocks with several cell forms (mLSTM) say which one ran
        kwargs = {**kwargs, "cell_used": module.cell_for(seq_len)}
    return {
        "block": name,
        "module": module,
        "state_size": state,
        "source": "mad_search",
        "options": kwargs,
    }


def _build_official(name: str, seq_len: int, opts: dict) -> dict:
    torch.manual_seed(opts["seed"])
    try:
        module = _official_xlstm.build(
            name,
            opts["d_model"],
            seq_len,
            num_heads=opts["num_heads"],
            conv_kernel=opts["conv_kernel"],
        )
    except (ValueError, AssertionError) as exc:
        raise BenchError(f"official {name} block at d_model {opts['d_model']}: {exc}") from None
    return {
        "block": OFFICIAL_PREFIX + name,
        "module": module,
        "state_size": _official_xlstm.state_size(name, module, seq_len),
        "source": "official_xlstm",
        "options": _official_xlstm.describe(name, module),
    }


def _ratios(rows: list[dict]) -> dict[str, dict[str, float]]:
    """ours / official tokens/s per block and sequence length (above 1: ours is faster), at the
    size the official blocks ran at."""
    speed = {(r["block"], r["d_model"], r["batch"], r["seq_len"]): r["tokens_per_s"] for r in rows}
    ratios: dict[str, dict[str, float]] = {}
    for (block, *size), official in speed.items():
        if block.startswith(OFFICIAL_PREFIX):
            name = block[len(OFFICIAL_PREFIX) :]
            ours = speed.get((name, *size))
            if ours is not None:
                ratios.setdefault(name, {})[str(size[-1])] = ours / official
    return ratios


def _study_size() -> dict[str, int]:
    """The default study's width, batch and input length (its task's, which may be shorter
    than ``task.seq_len``: in-context recall's last token is only a target)."""
    from omegaconf import OmegaConf

    from mad_search import tasks

    cfg = compose_config(["+sweep=layer_patterns"])
    task = OmegaConf.to_container(cfg.task, resolve=True)
    return {
        "d_model": int(cfg.model.d_model),
        "batch": int(cfg.train.batch_size),
        "seq_len": tasks.info(task.pop("name"), **task).seq_len,
    }


# --- options and environment --------------------------------------------------------------


def _validate(opts: dict) -> dict:
    for key in ("d_model", "num_heads", "batch", "iters"):
        if opts[key] < 1:
            raise BenchError(f"option {key} must be at least 1, got {opts[key]}")
    for key in ("warmup", "threads", "conv_kernel"):
        if opts[key] < 0:
            raise BenchError(f"option {key} must be 0 or more, got {opts[key]}")
    if not opts["seq_lens"] or any(s < 1 for s in opts["seq_lens"]):
        raise BenchError(f"option seq_lens must be positive integers, got {opts['seq_lens']}")
    return dict(opts)


def _block_library():
    try:
        import blocks
    except ImportError as exc:
        raise BenchError(f"the block library could not be imported: {exc}") from None
    return blocks


def _block_names(library, requested: list[str]) -> list[str]:
    available = library.names()
    unknown = [n for n in requested if n not in available]
    if unknown:
        raise BenchError(f"unknown block {unknown[0]!r}; valid blocks: {', '.join(available)}")
    return list(requested) if requested else available


def _check_block_options(block_options: dict, names: list[str]) -> None:
    for name, options in block_options.items():
        if name not in names:
            raise BenchError(
                f"block_options names block {name!r}, which is not benchmarked; "
                f"benchmarked: {', '.join(names)}"
            )
        if not isinstance(options, dict):
            raise BenchError(
                f"block_options.{name} must be a mapping of constructor options, got {options!r}"
            )


def _accepted(cls, candidates: dict[str, Any]) -> dict[str, Any]:
    """The subset of ``candidates`` that ``cls``'s constructor names as parameters."""
    params = inspect.signature(cls).parameters
    return {k: v for k, v in candidates.items() if k in params}


def _machine(threads: int) -> dict:
    return {
        "torch": torch.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "cores_available": available_cores(),
        "threads": threads,
        "interop_threads": torch.get_num_interop_threads(),
    }
