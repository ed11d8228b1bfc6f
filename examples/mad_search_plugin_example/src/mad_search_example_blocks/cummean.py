"""Causal cumulative mean: each position mixes the running mean of the sequence so far.

    out_t = W_out(mean(u_1 .. u_t)),  u = LayerNorm(x)

No ``@register`` here: the class is advertised directly by the entry point
``cummean = "mad_search_example_blocks.cummean:CumMean"`` in ``pyproject.toml``, and mad-search
registers it under the entry point's name, ``cummean``.
"""

from __future__ import annotations

import torch
from torch import nn

from blocks import Block


class CumMean(Block):
    """x + W_out(running mean of LayerNorm(x) up to t)."""

    def __init__(self, d_model: int, max_len: int, *, block_index: int = 0, num_blocks: int = 1):
        super().__init__(d_model, max_len, block_index=block_index, num_blocks=num_blocks)
        self.out_proj = nn.Linear(d_model, d_model, bias=False)
        nn.init.normal_(self.out_proj.weight, std=(d_model * 2 * num_blocks) ** -0.5)

    def mix(self, u: torch.Tensor) -> torch.Tensor:
        count = torch.arange(1, u.shape[1] + 1, dtype=u.dtype, device=u.device)
        return self.out_proj(u.cumsum(1) / count[:, None])

    def state_size(self, seq_len: int) -> int:
        """The running sum and the count: d_model + 1 floats."""
        return self.d_model + 1
