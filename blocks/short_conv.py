"""Gated short convolution (Liquid AI's LFM2 ``ShortConv`` operator) as a pre-norm residual block.

Per position t, with u the normed input and K = ``kernel_size`` (LFM2's ``L_cache``)::

    B_t, C_t, x_t = split(W_in u_t)                     three d_model-wide projections
    z_t = C_t * sum_{j=0}^{K-1} w_j * (B * x)_{t-j}     causal depthwise conv of the gated input
    out_t = W_out z_t

No biases (LFM2's ``conv_bias`` defaults to False and covers the projections and the conv).
LFM2 puts a SwiGLU after this operator in the same layer; here that is a separate block
(``short_conv swiglu`` in a layer-sequence spec).
"""

from __future__ import annotations

import torch
from torch import nn

from blocks.base import Block
from blocks.init import small_init_, wang_init_
from blocks.ops import causal_depthwise_conv
from blocks.registry import BlockError, register


@register("short_conv")
class ShortConvBlock(Block):
    """x + W_out(C * conv_K(B * x)) with (B, C, x) = W_in LayerNorm(x); LFM2's gated short conv."""

    def __init__(
        self,
        d_model: int,
        max_len: int,
        *,
        block_index: int = 0,
        num_blocks: int = 1,
        kernel_size: int = 3,
    ):
        super().__init__(d_model, max_len, block_index=block_index, num_blocks=num_blocks)
        if isinstance(kernel_size, bool) or not isinstance(kernel_size, int) or kernel_size < 1:
            raise BlockError(f"short_conv: kernel_size must be an integer >= 1: {kernel_size!r}")
        self.kernel_size = kernel_size
        self.in_proj = nn.Linear(d_model, 3 * d_model, bias=False)
        # Depthwise: one K-tap filter per channel. Conv1d is a cross-correlation, so with K - 1
        # zeros padded on the left, weight[..., K - 1] multiplies the current position.
        self.conv = nn.Conv1d(d_model, d_model, kernel_size, groups=d_model, bias=False)
        self.out_proj = nn.Linear(d_model, d_model, bias=False)
        small_init_(self.in_proj.weight, d_model)
        wang_init_(self.out_proj.weight, d_model, num_blocks)

    def mix(self, x: torch.Tensor) -> torch.Tensor:
        B, C, h = self.in_proj(x).chunk(3, dim=-1)  # each (batch, seq, d)
        z = C * causal_depthwise_conv(B * h, self.conv.weight)
        return self.out_proj(z)

    def state_size(self, seq_len: int) -> int:
        """The conv's window: the last ``kernel_size - 1`` gated inputs B*x, d_model each.

        The minimal decoding state, as the sLSTM/mLSTM convs here count it. (LFM2's cache keeps
        ``kernel_size`` columns, the current one included; zoology's ShortConvolution reports
        ``d_model * kernel_size``.) Independent of seq_len.
        """
        return (self.kernel_size - 1) * self.d_model
