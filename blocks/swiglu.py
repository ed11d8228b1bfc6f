"""SwiGLU gated MLP (Shazeer 2020) as a pre-norm residual block: x + W2(SiLU(W1 u) * W3 u)."""

from __future__ import annotations

import torch
from torch import nn

from blocks.base import Block
from blocks.init import round_up, small_init_, wang_init_
from blocks.ops import glu
from blocks.registry import BlockError, register


@register("swiglu")
class SwiGLUBlock(Block):
    """Channel mixer; hidden width ``expansion * d_model`` rounded up to ``multiple_of``."""

    def __init__(
        self,
        d_model: int,
        max_len: int,
        *,
        block_index: int = 0,
        num_blocks: int = 1,
        expansion: float = 8.0 / 3.0,
        multiple_of: int = 64,
    ):
        super().__init__(d_model, max_len, block_index=block_index, num_blocks=num_blocks)
        if expansion <= 0 or multiple_of <= 0:
            raise BlockError(
                f"swiglu: expansion and multiple_of must be positive, "
                f"got {expansion}, {multiple_of}"
            )
        self.hidden = round_up(expansion * d_model, multiple_of)
        self.gate_up = nn.Linear(d_model, 2 * self.hidden, bias=False)
        self.down = nn.Linear(self.hidden, d_model, bias=False)
        small_init_(self.gate_up.weight, d_model)
        wang_init_(self.down.weight, d_model, num_blocks)

    def mix(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(glu(self.gate_up(x), "silu"))

    def state_size(self, seq_len: int) -> int:
        """No recurrent state."""
        return 0
