"""Small operations several blocks share, written for speed on the CPU.

:func:`causal_depthwise_conv` is the short causal convolution of the mLSTM, sLSTM, Mamba and
gated short-conv blocks. Timed here (float32, forward + backward, one thread), the depthwise
channels-last 2-D convolution it runs beat nn.Conv1d, a sum of K shifted multiply-adds and a
hand-written autograd function (shifted multiply-adds both ways) at every size tried:

    (batch, seq, channels)   channels-last   Conv1d    shifted   hand-written
    (64, 47, 32)             0.76 ms         1.11      1.22      1.48
    (64, 47, 64)             1.47            2.43      2.57      2.74
    (16, 128, 128)           2.03            2.31      3.33      4.15
    (16, 256, 256)           8.06            9.86      16.6      29.0

(oneDNN has a dedicated depthwise kernel for channels-last input, backward included; the
general Conv1d path does not reach it.) ``tests/test_blocks.py`` checks it against the direct sum.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["causal_depthwise_conv"]


def causal_depthwise_conv(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None
) -> torch.Tensor:
    """Causal depthwise convolution along the sequence, ``(B, S, C) -> (B, S, C)``.

    ``weight`` is ``nn.Conv1d``'s ``(C, 1, K)``: ``y_t = bias + sum_k weight[:, 0, k] x_{t-K+1+k}``
    (zeros before the start), so ``weight[..., K - 1]`` multiplies the current position.
    """
    K = weight.shape[-1]
    # (B, S, C) seen as a channels-last (B, C, 1, S) image: no copy either way
    image = F.pad(x, (0, 0, K - 1, 0)).transpose(1, 2).unsqueeze(2)
    y = F.conv2d(image, weight.unsqueeze(2), bias, groups=weight.shape[0])
    return y.squeeze(2).transpose(1, 2)
