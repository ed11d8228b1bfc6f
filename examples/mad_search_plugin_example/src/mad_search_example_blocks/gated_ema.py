"""Gated causal EMA: a per-channel exponential moving average with an output gate.

Per position t, with u the normed input and a learned decay a in (0, 1) per channel::

    v_t, g_t = split(W_in u_t)
    h_t = a * h_{t-1} + (1 - a) * v_t             h_{-1} = 0
    out_t = W_out(sigmoid(g_t) * h_t)

The recurrence is evaluated in parallel as a causal convolution with the kernel
``(1 - a) * a**k``, k = 0..seq-1 (positions after t get weight 0, so the block is causal).
Its recurrent state is the running average h: one float per channel.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from blocks import Block, BlockError, register


@register("gated_ema")
class GatedEMABlock(Block):
    """x + W_out(sigmoid(g) * EMA_a(v)) with (v, g) = W_in LayerNorm(x)."""

    def __init__(
        self,
        d_model: int,
        max_len: int,
        *,
        block_index: int = 0,
        num_blocks: int = 1,
        min_decay: float = 0.5,
        max_decay: float = 0.99,
    ):
        super().__init__(d_model, max_len, block_index=block_index, num_blocks=num_blocks)
        if not 0.0 < min_decay <= max_decay < 1.0:
            raise BlockError(
                f"gated_ema: need 0 < min_decay <= max_decay < 1, got {min_decay}, {max_decay}"
            )
        self.in_proj = nn.Linear(d_model, 2 * d_model, bias=False)
        self.out_proj = nn.Linear(d_model, d_model, bias=False)
        # Decays spread from short to long memory across channels, stored as logits.
        decay = torch.linspace(min_decay, max_decay, d_model)
        self.decay_logit = nn.Parameter(torch.log(decay) - torch.log1p(-decay))
        nn.init.normal_(self.in_proj.weight, std=d_model**-0.5)
        nn.init.normal_(self.out_proj.weight, std=(d_model * 2 * num_blocks) ** -0.5)

    def mix(self, u: torch.Tensor) -> torch.Tensor:
        v, g = self.in_proj(u).chunk(2, dim=-1)  # each (batch, seq, d)
        seq = u.shape[1]
        pos = torch.arange(seq, device=u.device)
        lag = pos[:, None] - pos[None, :]  # (t, s): t - s, negative for the future
        log_a = F.logsigmoid(self.decay_logit)  # (d,)
        log_k = lag.clamp(min=0)[..., None] * log_a + F.logsigmoid(-self.decay_logit)
        kernel = log_k.exp().masked_fill((lag < 0)[..., None], 0.0)  # (t, s, d)
        h = torch.einsum("tsd,bsd->btd", kernel, v)
        return self.out_proj(torch.sigmoid(g) * h)

    def state_size(self, seq_len: int) -> int:
        """The running average h: d_model floats, whatever the sequence length."""
        return self.d_model
