"""Sliding-window causal attention: :class:`blocks.attention.AttentionBlock` with a window set.

Each position attends to itself and the ``window - 1`` positions before it. The default, 33,
is mad-lab's sliding-attention layer (``configs/layers/sliding-attention.yml``:
``window_size: [32, 32]``, causal): flash-attn lets query i see keys i - 32 ... i, i.e. 32
positions back plus itself. Every other option (heads, grouped KV heads, RoPE) is the attention
block's, with its defaults.
"""

from __future__ import annotations

from typing import Any

from blocks.attention import AttentionBlock
from blocks.registry import BlockError, register

MAD_LAB_WINDOW = 33  # flash-attn window_size=(32, 32), causal: 32 keys back + the query itself


@register("sliding_window_attention")
class SlidingWindowAttentionBlock(AttentionBlock):
    """x + Attention(LayerNorm(x)) where position t sees positions t - window + 1 ... t."""

    def __init__(
        self,
        d_model: int,
        max_len: int,
        *,
        block_index: int = 0,
        num_blocks: int = 1,
        window: int = MAD_LAB_WINDOW,
        **options: Any,
    ):
        if isinstance(window, bool) or not isinstance(window, int) or window <= 0:
            raise BlockError(
                f"sliding_window_attention: window must be a positive integer, got {window!r} "
                "(use 'attention' for full attention)"
            )
        super().__init__(
            d_model, max_len, block_index=block_index, num_blocks=num_blocks, window=window,
            **options,
        )
