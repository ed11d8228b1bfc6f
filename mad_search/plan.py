"""The validated plan of one run (:func:`mad_search.config.resolve` makes it).

Its own light module: a Hogwild worker unpickles a plan for every trial and need not import the
config layer (OmegaConf) to do so."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from mad_search.train import TrainConfig


@dataclass
class RunPlan:
    layers: list[str]
    pattern: str  # compact spec string of ``layers``
    d_model: int
    task_name: str
    task_settings: dict
    task_info: Any  # tasks.TaskInfo
    train: TrainConfig
    block_options: dict
    sparse_embedding: bool
    seed: int
    device: str
    threads: int | None
    budget: dict | None = None  # what model.budget chose: d_model, params, state, reached
    backend: str = "torch"  # torch | mlx (the blocks' MLX twins, mad_search.mlx_train)
    # added to the job's model seed (a protocol level's later seeds of one run); 0 otherwise
    model_seed_offset: int = 0
