"""MLX twin of :mod:`blocks.attention`: causal multi-head attention with RoPE, GQA and an
optional sliding window."""

from __future__ import annotations

import functools
import math

import mlx.core as mx
import mlx.nn as nn

from blocks.mlx.base import Block, small_init, wang_init
from blocks.registry import register


@functools.lru_cache(maxsize=32)
def rotary_tables(seq_len: int, head_dim: int, base: float) -> tuple[mx.array, mx.array]:
    """cos/sin tables (seq_len, head_dim // 2), computed in float64 by NumPy as the torch block
    computes them, then stored as float32."""
    import numpy as np

    inv_freq = 1.0 / (base ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim))
    angles = np.arange(seq_len, dtype=np.float64)[:, None] * inv_freq
    return mx.array(np.cos(angles), dtype=mx.float32), mx.array(np.sin(angles), dtype=mx.float32)


def apply_rotary(x: mx.array, cos: mx.array, sin: mx.array) -> mx.array:
    """Rotate the pairs (x[..., :d/2], x[..., d/2:]) by position-dependent angles."""
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half], x[..., half:]
    return mx.concatenate([x1 * cos - x2 * sin, x1 * sin + x2 * cos], axis=-1)


def causal_mask(seq_len: int, window: int | None) -> mx.array:
    """Additive mask (S, S): 0 where position t may see position s (s <= t, and t - s < window)."""
    i = mx.arange(seq_len)
    dist = i[:, None] - i[None, :]
    seen = dist >= 0
    if window is not None:
        seen = seen & (dist < window)
    return mx.where(seen, 0.0, -math.inf).astype(mx.float32)


@register("attention", backend="mlx")
class AttentionBlock(Block):
    torch_name = "attention"

    def __init__(self, d_model: int, max_len: int, **options):
        super().__init__(d_model, max_len, **options)
        kv_dim = self.num_kv_heads * self.head_dim
        self.qkv = nn.Linear(d_model, d_model + 2 * kv_dim, bias=False)
        self.out = nn.Linear(d_model, d_model, bias=False)
        self.qkv.weight = small_init((d_model + 2 * kv_dim, d_model), d_model)
        self.out.weight = wang_init((d_model, d_model), d_model, self.num_blocks)

    def mix(self, x: mx.array) -> mx.array:
        B, S, _ = x.shape
        kv_dim = self.num_kv_heads * self.head_dim
        qkv = self.qkv(x)
        qk, v = qkv[..., : self.d_model + kv_dim], qkv[..., self.d_model + kv_dim:]
        qk = qk.reshape(B, S, self.num_heads + self.num_kv_heads, self.head_dim)
        if self.position == "rope":
            cos, sin = rotary_tables(S, self.head_dim, self.rope_base)
            qk = apply_rotary(qk, cos[:, None], sin[:, None])
        qk = qk.transpose(0, 2, 1, 3)
        q, k = qk[:, : self.num_heads], qk[:, self.num_heads:]
        v = v.reshape(B, S, self.num_kv_heads, self.head_dim).transpose(0, 2, 1, 3)
        scale = 1.0 / math.sqrt(self.head_dim)
        if self.window is None or self.window >= S:
            y = mx.fast.scaled_dot_product_attention(q, k, v, scale=scale, mask="causal")
        else:
            y = mx.fast.scaled_dot_product_attention(
                q, k, v, scale=scale, mask=causal_mask(S, self.window)
            )
        return self.out(y.transpose(0, 2, 1, 3).reshape(B, S, self.d_model))


@register("sliding_window_attention", backend="mlx")
class SlidingWindowAttentionBlock(AttentionBlock):
    """Twin of :mod:`blocks.sliding_window_attention` (attention with mad-lab's window 33)."""

    torch_name = "sliding_window_attention"
