"""MLX twin of :mod:`blocks.short_conv`: LFM2's gated short convolution,
x + W_out(C * conv_K(B * h)) with (B, C, h) = W_in LayerNorm(x).

Also home of :class:`DepthwiseConv1d`, the torch-layout depthwise convolution that the Hyena and
Mamba twins share.
"""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn

from blocks.mlx.base import Block, conv_weight, small_init, wang_init
from blocks.mlx.ops import causal_depthwise_conv
from blocks.registry import register


class DepthwiseConv1d(nn.Module):
    """The parameters of a depthwise ``torch.nn.Conv1d(C, C, K, groups=C)`` in torch's layout:
    ``weight`` (C, 1, K) and optional ``bias`` (C,), with nn.Conv1d's default initialisation.
    Calling it applies the convolution causally to channels-last ``(B, S, C)`` input (K - 1 zeros
    on the left), whatever padding the torch module was built with: the torch blocks call
    :func:`blocks.ops.causal_depthwise_conv` or pad on the left themselves."""

    def __init__(self, channels: int, kernel: int, bias: bool = True):
        super().__init__()
        weight, b = conv_weight(channels, kernel, bias)
        self.weight = weight
        if bias:
            self.bias = b

    def __call__(self, x: mx.array) -> mx.array:
        return causal_depthwise_conv(x, self.weight, self.get("bias"))


@register("short_conv", backend="mlx")
class ShortConvBlock(Block):
    torch_name = "short_conv"

    def __init__(self, d_model: int, max_len: int, **options):
        super().__init__(d_model, max_len, **options)
        self.in_proj = nn.Linear(d_model, 3 * d_model, bias=False)
        self.conv = DepthwiseConv1d(d_model, self.kernel_size, bias=False)
        self.out_proj = nn.Linear(d_model, d_model, bias=False)
        self.in_proj.weight = small_init((3 * d_model, d_model), d_model)
        self.out_proj.weight = wang_init((d_model, d_model), d_model, self.num_blocks)

    def mix(self, x: mx.array) -> mx.array:
        b, c, h = mx.split(self.in_proj(x), 3, axis=-1)
        return self.out_proj(c * self.conv(b * h))
