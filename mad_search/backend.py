"""Train a run plan with its backend: torch (:func:`mad_search.train.train_plan`) or MLX
(:func:`mad_search.mlx_train.train_plan_mlx`, imported only when a plan asks for it)."""

from __future__ import annotations

import contextlib
from typing import Any


def train_plan(plan: Any, data: dict, *, embedding=None, on_eval=None, seed: int | None = None,
               device: str | None = None,
               build_lock: contextlib.AbstractContextManager | None = None,
               mlx_init: str = "mlx") -> tuple[Any, Any]:
    """Build ``plan``'s model and train it on ``data`` with ``plan.backend``; returns the model
    and its :class:`~mad_search.train.TrainResult`. ``embedding`` is the pool's shared table
    (a torch or an MLX table embedding to match); ``mlx_init="torch"`` starts an MLX model from
    the weights the torch model gets with the same seed. ``device`` is torch's only."""
    if plan.backend == "mlx":
        from mad_search.mlx_train import train_plan_mlx

        with build_lock or contextlib.nullcontext():
            return train_plan_mlx(plan, data, embedding=embedding, on_eval=on_eval, seed=seed,
                                  init=mlx_init)
    from mad_search.train import train_plan as train_torch

    return train_torch(plan, data, embedding=embedding, on_eval=on_eval, seed=seed, device=device,
                       build_lock=build_lock)
