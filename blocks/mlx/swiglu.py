"""MLX twin of :mod:`blocks.swiglu`: x + W2(SiLU(W1 u) * W3 u)."""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn

from blocks.mlx.base import Block, small_init, wang_init
from blocks.registry import register


@register("swiglu", backend="mlx")
class SwiGLUBlock(Block):
    torch_name = "swiglu"

    def __init__(self, d_model: int, max_len: int, **options):
        super().__init__(d_model, max_len, **options)
        self.gate_up = nn.Linear(d_model, 2 * self.hidden, bias=False)
        self.down = nn.Linear(self.hidden, d_model, bias=False)
        self.gate_up.weight = small_init((2 * self.hidden, d_model), d_model)
        self.down.weight = wang_init((d_model, self.hidden), d_model, self.num_blocks)

    def mix(self, x: mx.array) -> mx.array:
        gate, up = mx.split(self.gate_up(x), 2, axis=-1)
        return self.down(nn.silu(gate) * up)
