"""Blocks benchmark: forward+backward throughput of every registered block, float32, CPU.

    python -m mad_search.bench blocks [seq_lens=[128,256]] [iters=9] [threads=2]
        [study_size=true] [backend=torch|mlx] [out=PATH]

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

``backend=mlx`` adds, in the same rounds, every block's MLX twin holding the torch block's weights
(forward + backward: gradients of the parameters and the input, evaluated), as rows with
``backend: mlx``; ``mlx_vs_torch`` is MLX / torch tokens/s per block and size, and
``max_output_diff`` the largest difference between the two blocks' outputs on the timed input.
The result also records the matrix-product rates that explain the gaps (``matmul_gflops``: torch
and MLX, 512 x 512 float32, on the benchmark's threads) and which BLAS MLX used.
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
    "backend": "torch",  # torch | mlx: mlx also times every block's MLX twin beside it
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
    mlx = _mlx_setup(threads) if opts["backend"] == "mlx" else None
    sizes = [(opts, seq_len, official_names) for seq_len in opts["seq_lens"]]
    if opts["study_size"]:
        study = _study_size()
        sizes.insert(0, ({**opts, **study}, study["seq_len"], []))
    try:
        rows = []
        for size_opts, seq_len, official in sizes:
            entries = [_build_ours(library, name, seq_len, size_opts) for name in names]
            entries += [_build_official(name, seq_len, size_opts) for name in official]
            if mlx is not None:
                entries += [_build_twin(e) for e in entries if e["source"] == "mad_search"]
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
        **({"mlx": mlx, "mlx_vs_torch": _mlx_ratios(rows)} if mlx is not None else {}),
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
    lines = [head, f"official: {result['official']}"]
    mlx = result.get("mlx")
    if mlx:
        rates = mlx["matmul_gflops"]
        lines.append(
            f"mlx {mlx['version']}, BLAS: {mlx['blas']}; 512x512 float32 products: torch "
            f"{rates['torch']:.1f} GFLOP/s, mlx {rates['mlx']:.1f} GFLOP/s; ratio column of mlx "
            "rows: mlx/torch"
        )
    lines.append("")
    cols = ("block", "backend", "d_model", "batch", "seq_len", "tokens/s", "ms/iter", "min ms")
    cols += ("params", "state_size", "ratio")
    width = max([22] + [len(row["block"]) for row in result["rows"]])
    fmt = "{:<" + str(width) + "} {:>7} {:>7} {:>5} {:>7} {:>10} {:>9} {:>9} {:>9} {:>11} {:>9}"
    mlx_ratios = result.get("mlx_vs_torch") or {}
    lines.append(fmt.format(*cols))
    lines.append("-" * len(fmt.format(*cols)))
    for row in result["rows"]:
        ratio = None
        if row.get("backend") == "mlx":
            ratio = mlx_ratios.get(row["block"], {}).get(_size_key(row))
        elif row["d_model"] == cfg["d_model"] and row["batch"] == cfg["batch"]:
            ratio = ratios.get(row["block"], {}).get(str(row["seq_len"]))
        state = row["state_size"]
        lines.append(
            fmt.format(
                row["block"],
                row.get("backend", "torch"),
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
    if isinstance(module, _Twin):
        return module.one_pass()
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
    for module in modules:
        if isinstance(module, _Twin):
            module.bind(x)
    all_times = time_rounds(modules, x, opts["warmup"], opts["iters"])
    rows = []
    for entry, module, times in zip(entries, modules, all_times):
        median = statistics.median(times)
        rows.append(
            {
                "block": entry.pop("block"),
                "backend": entry.pop("backend", "torch"),
                "d_model": opts["d_model"],
                "batch": opts["batch"],
                "seq_len": seq_len,
                "tokens_per_s": opts["batch"] * seq_len / median,
                "ms_per_iter": 1000 * median,
                "ms_min": 1000 * min(times),
                "params": module.num_params() if isinstance(module, _Twin) else sum(
                    p.numel() for p in module.parameters() if p.requires_grad),
                **({"max_output_diff": module.max_output_diff(x)}
                   if isinstance(module, _Twin) else {}),
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
        kwargs = {**kwargs, "cell_used": module.cell_for(seq_len, "cpu", torch.float32)}
    return {
        "block": name,
        "module": module,
        "state_size": state,
        "source": "mad_search",
        "options": kwargs,
    }


class _Twin:
    """An MLX twin holding a torch block's weights, timed like a torch module: one pass is the
    forward and the gradients of its parameters and of the input, evaluated."""

    def __init__(self, torch_block: nn.Module, name: str, seq_len: int, options: dict):
        import blocks
        from mad_search.mlx_train import load_torch_state

        self.torch_block = torch_block
        self.block = blocks.build(name, torch_block.d_model, seq_len, backend="mlx", **options)
        load_torch_state(self.block, torch_block.state_dict())
        self.x = None

    def train(self) -> None:
        pass

    def num_params(self) -> int:
        return self.block.num_params()

    def bind(self, x: torch.Tensor) -> None:
        import mlx.core as mx

        block = self.block

        def loss(params, inp):
            block.update(params)
            return block(inp).sum()

        self.x = mx.array(x.detach().numpy())
        self.grad = mx.value_and_grad(loss, argnums=(0, 1))

    def one_pass(self) -> float:
        import mlx.core as mx

        start = time.perf_counter()
        value, grads = self.grad(self.block.trainable_parameters(), self.x)
        mx.eval(value, grads)
        return time.perf_counter() - start

    def max_output_diff(self, x: torch.Tensor) -> float:
        import numpy as np

        with torch.no_grad():
            want = self.torch_block(x).numpy()
        return float(np.abs(np.array(self.block(self.x)) - want).max())


def _build_twin(entry: dict) -> dict:
    options = {k: v for k, v in entry["options"].items() if k != "cell_used"}
    return {
        "block": entry["block"],
        "backend": "mlx",
        "module": _Twin(entry["module"], entry["block"], entry["module"].max_len, options),
        "state_size": entry["state_size"],
        "source": "mad_search",
        "options": options,
    }


def _mlx_setup(threads: int) -> dict:
    """Import the twins (OpenBLAS first, on the benchmark's threads); the version, BLAS and
    512 x 512 float32 matrix-product rates of torch and MLX."""
    try:
        import blocks.mlx  # noqa: F401
    except ImportError as exc:
        raise BenchError(f"backend=mlx needs the mlx extra (pip install 'mad-search[mlx]'): "
                         f"{exc}") from None
    import mlx.core as mx

    from blocks.mlx import blas

    blas.set_threads(threads)
    n, reps = 512, 20
    a, b = torch.randn(n, n), torch.randn(n, n)
    am, bm = mx.array(a.numpy()), mx.array(b.numpy())
    rates = {}
    for name, product in (("torch", lambda: a @ b), ("mlx", lambda: mx.eval(am @ bm))):
        product()
        start = time.perf_counter()
        for _ in range(reps):
            product()
        rates[name] = 2 * n**3 * reps / (time.perf_counter() - start) / 1e9
    return {"version": mx.__version__, "blas": blas.status, "matmul_gflops": rates}


def _size_key(row: dict) -> str:
    return f"d{row['d_model']}_b{row['batch']}_s{row['seq_len']}"


def _mlx_ratios(rows: list[dict]) -> dict[str, dict[str, float]]:
    """MLX / torch tokens/s per block and size (above 1: the MLX twin is faster)."""
    torch_rows = {(r["block"], _size_key(r)): r["tokens_per_s"] for r in rows
                  if r.get("backend", "torch") == "torch"}
    out: dict[str, dict[str, float]] = {}
    for r in rows:
        if r.get("backend") == "mlx":
            ref = torch_rows.get((r["block"], _size_key(r)))
            if ref:
                out.setdefault(r["block"], {})[_size_key(r)] = r["tokens_per_s"] / ref
    return out


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
    speed = {(r["block"], r["d_model"], r["batch"], r["seq_len"]): r["tokens_per_s"] for r in rows
             if r.get("backend", "torch") == "torch"}
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
    if opts["backend"] not in ("torch", "mlx"):
        raise BenchError(f"option backend must be torch or mlx, got {opts['backend']!r}")
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
