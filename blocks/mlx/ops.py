"""Shared MLX kernels of the twins (the counterparts of :mod:`blocks.ops`)."""

from __future__ import annotations

import mlx.core as mx


def causal_depthwise_conv(x: mx.array, weight: mx.array, bias: mx.array | None = None) -> mx.array:
    """Causal depthwise convolution over time: ``y[:, t, c] = bias[c] + sum_j weight[c, 0, j] *
    x[:, t - K + 1 + j, c]`` (zero before the start). ``x`` is (B, S, C); ``weight`` is in torch's
    layout (C, 1, K), as the torch block stores it."""
    channels, _, kernel = weight.shape
    padded = mx.pad(x, [(0, 0), (kernel - 1, 0), (0, 0)])
    y = mx.conv1d(padded, weight.transpose(0, 2, 1), groups=channels)  # MLX: (C_out, K, C_in/g)
    return y if bias is None else y + bias
