"""Fair budgets: pick the model width so every pattern gets the same parameter or state budget.

MAD compares architectures at equal state size; scaling work compares them at equal parameter
count. ``model.budget.params=N`` (non-embedding parameters: the blocks and the final norm; the
embedding and head depend only on the vocabulary) or ``model.budget.state=N`` (total recurrent
state, floats per sequence at the task's sequence length) replaces ``model.d_model`` with the width,
a multiple of ``model.budget.multiple``, whose count is closest to the target without exceeding
it (or the smallest width, if even that is over; the run records what was reached).

Widths are tried on PyTorch's ``meta`` device, so no memory is allocated for the candidates.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping, Sequence

import torch

from mad_search.errors import UserError


class BudgetError(UserError):
    """A budget that cannot be met (one-line message)."""


def measure(
    layers: Sequence[str],
    d_model: int,
    max_len: int,
    seq_len: int,
    block_options: Mapping | None = None,
) -> tuple[int, int]:
    """(non-embedding parameters, total state size) of a layer list at width ``d_model``."""
    from mad_search.model import build_blocks

    with torch.device("meta"):
        stack = build_blocks(layers, d_model, max_len, block_options)
    params = sum(p.numel() for p in stack.parameters()) + d_model  # + the final norm
    state = sum(int(b.state_size(seq_len)) for b in stack)
    return params, state


@functools.lru_cache(maxsize=256)
def _cached(
    layers: tuple, max_len: int, seq_len: int, params, state, options_key: str, multiple: int
) -> dict:
    import json

    return _width_for_budget(
        list(layers),
        max_len,
        seq_len,
        params=params,
        state=state,
        block_options=json.loads(options_key),
        multiple=multiple,
    )


def width_for_budget(
    layers: Sequence[str],
    max_len: int,
    seq_len: int,
    *,
    params: int | None = None,
    state: int | None = None,
    block_options: Mapping | None = None,
    multiple: int = 16,
) -> dict:
    """The width meeting a parameter or state budget, and what it reaches (cached)."""
    import json

    key = json.dumps(block_options or {}, sort_keys=True, default=str)
    return dict(_cached(tuple(layers), max_len, seq_len, params, state, key, multiple))


def _width_for_budget(
    layers: Sequence[str],
    max_len: int,
    seq_len: int,
    *,
    params: int | None = None,
    state: int | None = None,
    block_options: Mapping | None = None,
    multiple: int = 16,
    max_width: int = 4096,
) -> dict:
    """The width meeting a parameter or state budget, and what it reaches."""
    if (params is None) == (state is None):
        raise BudgetError("give exactly one of model.budget.params or model.budget.state")
    target = params if params is not None else state
    kind = "params" if params is not None else "state"
    if not isinstance(target, int) or target <= 0:
        raise BudgetError(f"model.budget.{kind} must be a positive integer, got {target!r}")
    if not isinstance(multiple, int) or multiple <= 0:
        raise BudgetError(f"model.budget.multiple must be a positive integer, got {multiple!r}")

    # Counts grow monotonically with width for every block we ship: bisect over the multiples.
    def at(k: int) -> dict:
        p, s = measure(layers, k * multiple, max_len, seq_len, block_options)
        return {"d_model": k * multiple, "params": p, "state": s}

    lo, hi = 1, max_width // multiple
    best = at(lo)
    if best[kind] <= target:
        while lo < hi:  # invariant: at(lo) fits
            mid = (lo + hi + 1) // 2
            cand = at(mid)
            if cand[kind] <= target:
                lo, best = mid, cand
            else:
                hi = mid - 1
    best.update(kind=kind, target=target, reached=best[kind] / target)
    return best
