"""Causal multi-head self-attention (Vaswani et al. 2017) as a pre-norm residual block.

Uses ``torch.nn.functional.scaled_dot_product_attention``. Options: rotary position encoding
(Su et al. 2021) or none, grouped-query heads (Ainslie et al. 2023: fewer ``num_kv_heads``)
and a sliding window (each position attends to itself and the ``window - 1`` positions before it).
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import nn

from blocks.base import Block
from blocks.init import small_init_, wang_init_
from blocks.registry import BlockError, register


@functools.lru_cache(maxsize=32)
def rotary_tables(seq_len: int, head_dim: int, base: float, device=None, dtype=torch.float32):
    """cos/sin tables of shape (seq_len, head_dim // 2) for rotary position encoding (cached:
    the same few sizes come back every step; treat them as read-only). Built outside any
    inference mode, so tables first made during evaluation still serve training."""
    with torch.inference_mode(False), torch.no_grad():
        steps = torch.arange(0, head_dim, 2, device=device, dtype=torch.float64)
        inv_freq = 1.0 / (base ** (steps / head_dim))
        angles = torch.arange(seq_len, device=device, dtype=torch.float64)[:, None] * inv_freq
        return angles.cos().to(dtype), angles.sin().to(dtype)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate pairs (x[..., :d/2], x[..., d/2:]) of x by position-dependent angles: cos and sin
    broadcast against x[..., :d/2], e.g. x (B, H, S, D) with tables (S, D/2), or x (B, S, H, D)
    with tables (S, 1, D/2)."""
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half], x[..., half:]
    return torch.cat((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1)


@register("attention")
class AttentionBlock(Block):
    """x + Attention(LayerNorm(x)), causal, optional RoPE / GQA / sliding window."""

    def __init__(
        self,
        d_model: int,
        max_len: int,
        *,
        block_index: int = 0,
        num_blocks: int = 1,
        num_heads: int = 4,
        num_kv_heads: int | None = None,
        window: int | None = None,
        position: str = "rope",
        rope_base: float = 10000.0,
    ):
        super().__init__(d_model, max_len, block_index=block_index, num_blocks=num_blocks)
        num_kv_heads = num_heads if num_kv_heads is None else num_kv_heads
        if num_heads <= 0 or d_model % num_heads:
            raise BlockError(
                f"attention: d_model {d_model} must be divisible by num_heads {num_heads}"
            )
        if num_kv_heads <= 0 or num_heads % num_kv_heads:
            raise BlockError(
                f"attention: num_heads {num_heads} must be a multiple of "
                f"num_kv_heads {num_kv_heads}"
            )
        if window is not None and window <= 0:
            raise BlockError(f"attention: window must be a positive integer or null, got {window}")
        if position not in ("rope", "none"):
            raise BlockError(f"attention: position must be 'rope' or 'none', got {position!r}")
        self.num_heads, self.num_kv_heads = num_heads, num_kv_heads
        self.head_dim = d_model // num_heads
        if position == "rope" and self.head_dim % 2:
            raise BlockError(f"attention: rope needs an even head dim, got {self.head_dim}")
        self.window, self.position, self.rope_base = window, position, rope_base
        kv_dim = num_kv_heads * self.head_dim
        self.qkv = nn.Linear(d_model, d_model + 2 * kv_dim, bias=False)
        self.out = nn.Linear(d_model, d_model, bias=False)
        small_init_(self.qkv.weight, d_model)
        wang_init_(self.out.weight, d_model, num_blocks)

    def _mask(self, seq_len: int, device) -> torch.Tensor | None:
        if self.window is None or self.window >= seq_len:
            return None
        i = torch.arange(seq_len, device=device)
        dist = i[:, None] - i[None, :]
        return (dist >= 0) & (dist < self.window)

    def mix(self, x: torch.Tensor) -> torch.Tensor:
        B, S, _ = x.shape
        kv_dim = self.num_kv_heads * self.head_dim
        qk, v = self.qkv(x).split([self.d_model + kv_dim, kv_dim], dim=-1)
        qk = qk.view(B, S, self.num_heads + self.num_kv_heads, self.head_dim)
        if self.position == "rope":  # queries and keys rotated together: half the operations
            cos, sin = rotary_tables(S, self.head_dim, self.rope_base, x.device, x.dtype)
            qk = apply_rotary(qk, cos.unsqueeze(1), sin.unsqueeze(1))
        q, k = qk.transpose(1, 2).split([self.num_heads, self.num_kv_heads], dim=1)
        v = v.view(B, S, self.num_kv_heads, self.head_dim).transpose(1, 2)
        mask = self._mask(S, x.device)
        gqa = self.num_kv_heads != self.num_heads
        if mask is None:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa)
        else:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=gqa)
        return self.out(y.transpose(1, 2).reshape(B, S, self.d_model))

    def state_size(self, seq_len: int) -> int:
        """KV cache: keys and values of every position the last query can see."""
        seen = seq_len if self.window is None else min(seq_len, self.window)
        return 2 * self.num_kv_heads * self.head_dim * seen
