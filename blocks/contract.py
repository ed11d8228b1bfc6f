"""The block contract, checked on the first build of each block type in a process.

Every block type, built-in or third-party, must be a ``torch.nn.Module`` with a
``state_size(seq_len)`` method that maps a float32 ``(batch, seq, d_model)`` tensor to a finite
float32 tensor of the same shape, causally (the output at position t never depends on inputs after
t). :func:`check_block` runs a block once on a small random input and refuses one that breaks any
of this with a one-line :class:`~blocks.registry.BlockError`, e.g.::

    block 'my_block' (my_pkg.blocks.MyBlock) breaks the block contract: not causal: output at
    position 3 changes when inputs after it change

so a block that peeks at the future is stopped at config time instead of scoring a perfect,
meaningless accuracy. :func:`blocks.build` calls it the first time a class is built with a given
set of options (a few milliseconds, once per block type per process).

The probe leaves no trace: it draws its input from a local ``torch.Generator`` and restores the
global RNG state, runs in eval mode under ``no_grad`` and then puts back every submodule's training
flag and the plain attributes its forward pass set (counters, caches, auxiliary losses).

``MAD_SEARCH_SKIP_CONTRACT=1`` skips the check. It is for debugging a block only: a block that
breaks the contract then fails later and less clearly, or silently reads the future.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from numbers import Integral
from typing import Any

import torch
from torch import nn

from blocks.base import BlockError

SKIP_ENV = "MAD_SEARCH_SKIP_CONTRACT"
PROBE_BATCH = 2
PROBE_SEQ = 16
PROBE_SEED = 0
RTOL = 1e-5  # causality tolerance, relative to the output's largest magnitude

_NN_DICTS = ("_parameters", "_buffers", "_modules")


def skipped() -> bool:
    """Whether the contract check is switched off (``MAD_SEARCH_SKIP_CONTRACT=1``)."""
    return os.environ.get(SKIP_ENV, "").strip().lower() in ("1", "true", "yes", "on")


def check_block(
    name: str, module: Any, d_model: int, max_len: int, *, origin: Callable | None = None
) -> None:
    """Refuse ``module`` (block type ``name``) with a one-line ``BlockError`` if it breaks the
    contract; ``origin`` is the registered class or factory, named in the message."""
    failure = _first_failure(module, d_model, max_len)
    if failure is not None:
        where = origin if origin is not None else type(module)
        qualname = getattr(where, "__qualname__", getattr(where, "__name__", repr(where)))
        raise BlockError(
            f"block {name!r} ({where.__module__}.{qualname}) breaks the block contract: {failure}"
        )


def _first_failure(module: Any, d_model: int, max_len: int) -> str | None:
    if not isinstance(module, nn.Module):
        return f"not a torch.nn.Module (got {type(module).__module__}.{type(module).__qualname__})"
    if not callable(getattr(module, "state_size", None)):
        return "no state_size(seq_len) method (floats of recurrent state per sequence)"
    seq = min(max_len, PROBE_SEQ)
    with _no_trace(module):
        failure = _probe(module, d_model, seq)
    if failure is not None:
        return failure
    try:
        size = module.state_size(seq)
    except Exception as exc:
        return f"state_size({seq}) raised {_describe(exc)}"
    if isinstance(size, bool) or not isinstance(size, Integral) or size < 0:
        return f"state_size({seq}) returned {size!r}; expected a non-negative int"
    return None


def _probe(module: nn.Module, d_model: int, seq: int) -> str | None:
    """Shape, dtype, finiteness and causality on one forward pass of a small random batch.

    Rows 0..PROBE_BATCH-1 are random inputs; row PROBE_BATCH + t repeats row 0 with every position
    after t redrawn, so its outputs up to t must equal row 0's.
    """
    tensors = [*module.parameters(), *module.buffers()]
    device = tensors[0].device if tensors else torch.device("cpu")
    gen = torch.Generator().manual_seed(PROBE_SEED)
    x = torch.randn(PROBE_BATCH, seq, d_model, generator=gen)
    noise = torch.randn(seq - 1, seq, d_model, generator=gen)
    after = torch.arange(seq)[None, :] > torch.arange(seq - 1)[:, None]  # (t, position)
    perturbed = torch.where(after[..., None], noise, x[:1])
    inputs = torch.cat([x, perturbed]).to(device)
    try:
        y = module(inputs)
    except Exception as exc:
        return f"forward raised {_describe(exc)} on a {tuple(inputs.shape)} float32 input"
    if not isinstance(y, torch.Tensor):
        return f"forward returned {type(y).__qualname__}, not a tensor"
    if y.shape != inputs.shape:
        return f"output shape {tuple(y.shape)} differs from input shape {tuple(inputs.shape)}"
    if y.dtype != inputs.dtype:
        return f"output dtype {y.dtype} differs from input dtype {inputs.dtype}"
    if not torch.isfinite(y).all():
        return "non-finite output (nan or inf) on random input"
    y = y.float().cpu()
    base, rows = y[0], y[PROBE_BATCH:]
    tol = RTOL * max(1.0, float(base.abs().max()))
    changed = (rows - base).abs().amax(-1) > tol  # (t, position)
    changed &= ~after
    if changed.any():
        pos = int(changed.nonzero()[:, 1].min())
        return f"not causal: output at position {pos} changes when inputs after it change"
    return None


@contextmanager
def _no_trace(module: nn.Module) -> Iterator[None]:
    """Eval mode, no grad, global RNG restored; afterwards each submodule's training flag, plain
    attributes and buffers are what they were before."""
    saved = [(m, m.training, dict(m._buffers), _plain(m)) for m in module.modules()]
    try:
        with torch.random.fork_rng(devices=[]), torch.no_grad():
            module.eval()
            yield
    finally:
        for m, training, buffers, attrs in saved:
            for key in set(_plain(m)) - set(attrs):
                delattr(m, key)
            for key, value in attrs.items():
                if vars(m).get(key, _MISSING) is not value:
                    object.__setattr__(m, key, value)
            m._buffers.clear()
            m._buffers.update(buffers)
            m.training = training


def _plain(m: nn.Module) -> dict[str, Any]:
    return {k: v for k, v in vars(m).items() if k not in _NN_DICTS}


_MISSING = object()


def _describe(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0]}" if text else type(exc).__name__
