"""Weight initialisations shared by several blocks (xLSTM's naming)."""

from __future__ import annotations

import math

import torch


def small_init_(weight: torch.Tensor, dim: int) -> torch.Tensor:
    """ "Small init" (Nguyen & Salazar 2019, used by xLSTM): N(0, sqrt(2 / (5 * dim)))."""
    return torch.nn.init.normal_(weight, mean=0.0, std=math.sqrt(2.0 / (5.0 * dim)))


def wang_init_(weight: torch.Tensor, dim: int, num_blocks: int) -> torch.Tensor:
    """Wang init, for projections into the residual stream: N(0, 2 / (num_blocks sqrt(dim)))."""
    return torch.nn.init.normal_(weight, mean=0.0, std=2.0 / (max(num_blocks, 1) * math.sqrt(dim)))


def round_up(value: float, multiple: int) -> int:
    """Smallest multiple of ``multiple`` that is >= ``value``."""
    return int(math.ceil(value / multiple) * multiple)
