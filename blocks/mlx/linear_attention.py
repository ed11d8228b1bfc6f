"""MLX twin of :mod:`blocks.linear_attention`: causal multi-head linear attention (Katharopoulos
et al. 2020). Per head, with feature maps φ_q, φ_k::

    o_t = Σ_{s≤t} (φ_q(q_t)·φ_k(k_s)) v_s / (φ_q(q_t)·Σ_{s≤t} φ_k(k_s) + ε)

(the normaliser only with ``normalize``). Feature maps: ``elu`` (elu + 1), ``relu``,
``identity``, ``taylor`` (Based's second-order Taylor map, φ(q)·φ(k) = 1 + q·k/√d +
(q·k)²/2d) and mad-lab's learned ``elementwise_product`` (W_1 x + b_1) ⊙ (W_2 x + b_2).

With ``tie_feature_map_qk`` the torch block's state_dict names the shared map twice
(``feature_map_q.*`` and ``feature_map_k.*``). The twin keeps ``feature_map_k`` as a frozen
mirror of ``feature_map_q`` (copied on every :meth:`update`, so loading and optimiser steps keep
it equal) and applies ``feature_map_q`` to both: the trainable parameters, their count and their
gradients are the torch block's.
"""

from __future__ import annotations

import functools
import math

import mlx.core as mx
import mlx.nn as nn

from blocks.mlx.base import Block, linear, small_init, wang_init
from blocks.registry import register


@functools.lru_cache(maxsize=16)
def _upper_pairs(d: int) -> mx.array:
    """Flat indices i·d + j of the pairs i < j (row-major, as torch.triu_indices lists them)."""
    return mx.array([i * d + j for i in range(d) for j in range(i + 1, d)], dtype=mx.int32)


def taylor_features(x: mx.array) -> mx.array:
    """[1, x/d^¼, x_i²/√(2d), x_i x_j/√d for i < j]: φ(q)·φ(k) = 1 + q·k/√d + (q·k)²/(2d)."""
    d = x.shape[-1]
    outer = (x[..., :, None] * x[..., None, :]).reshape(*x.shape[:-1], d * d)
    return mx.concatenate([
        mx.ones_like(x[..., :1]),
        x / d**0.25,
        mx.square(x) / math.sqrt(2 * d),
        mx.take(outer, _upper_pairs(d), axis=-1) / math.sqrt(d),
    ], axis=-1)


class HadamardFeatureMap(nn.Module):
    """φ(x) = (W_1 x + b_1) ⊙ (W_2 x + b_2) on one head's vector (nn.Linear's default init)."""

    def __init__(self, head_dim: int):
        super().__init__()
        self.layer1 = linear(head_dim, head_dim)
        self.layer2 = linear(head_dim, head_dim)

    def __call__(self, x: mx.array) -> mx.array:
        return self.layer1(x) * self.layer2(x)


def linear_attention_chunked(q: mx.array, k: mx.array, v: mx.array, eps: float = 1e-12,
                             normalize: bool = True, chunk: int = 64) -> mx.array:
    """Features ``q, k: (B, H, S, F)``, values ``v: (B, H, S, dv)`` -> (B, H, S, dv): masked
    products inside chunks, the running sum of φ(k) vᵀ over earlier chunks."""
    batch, heads, seq, feat = q.shape
    dv = v.shape[-1]
    den = (q * mx.cumsum(k, axis=2)).sum(-1, keepdims=True) + eps if normalize else None
    num_chunks = -(-seq // chunk)
    pad = num_chunks * chunk - seq
    if pad:
        q, k, v = (mx.pad(x, [(0, 0), (0, 0), (0, pad), (0, 0)]) for x in (q, k, v))
    q, k = (x.reshape(batch, heads, num_chunks, chunk, feat) for x in (q, k))
    v = v.reshape(batch, heads, num_chunks, chunk, dv)
    i = mx.arange(chunk)
    scores = mx.where(i[:, None] >= i[None, :], q @ k.swapaxes(-1, -2), 0.0)
    kv = k.swapaxes(-1, -2) @ v  # (B, H, nC, F, dv): each chunk's Σ φ(k_s) v_sᵀ
    before = mx.cumsum(kv, axis=2) - kv  # sum over the earlier chunks
    out = (scores @ v + q @ before).reshape(batch, heads, num_chunks * chunk, dv)[:, :, :seq]
    return out / den if normalize else out


@register("linear_attention", backend="mlx")
class LinearAttentionBlock(Block):
    """x + LinearAttention(LayerNorm(x))."""

    torch_name = "linear_attention"

    def __init__(self, d_model: int, max_len: int, **options):
        super().__init__(d_model, max_len, **options)
        ref = self._reference
        self.q_proj = nn.Linear(d_model, self.key_dim, bias=False)
        self.k_proj = nn.Linear(d_model, self.key_dim, bias=False)
        self.v_proj = nn.Linear(d_model, self.value_dim, bias=False)
        self.out_proj = nn.Linear(self.value_dim, d_model, bias=False)
        for lin in (self.q_proj, self.k_proj, self.v_proj):
            lin.weight = small_init(lin.weight.shape, d_model)
        self.out_proj.weight = wang_init(self.out_proj.weight.shape, d_model, self.num_blocks)
        self.tied = False
        if self.feature_map == "elementwise_product":
            self.tied = ref.feature_map_k is ref.feature_map_q
            self.feature_map_q = HadamardFeatureMap(self.head_k_dim)
            self.feature_map_k = HadamardFeatureMap(self.head_k_dim)
            if self.tied:
                self.feature_map_k.freeze()
                self._mirror()

    def _mirror(self) -> None:
        """Tied maps: feature_map_k holds feature_map_q's current weights."""
        self.feature_map_k.update(self.feature_map_q.parameters())

    def update(self, parameters: dict, strict: bool = True) -> LinearAttentionBlock:
        super().update(parameters, strict)
        if self.tied:
            self._mirror()
        return self

    def _features(self, x: mx.array, which: str) -> mx.array:
        if self.feature_map == "elementwise_product":
            return (self.feature_map_q if self.tied else getattr(self, f"feature_map_{which}"))(x)
        if self.feature_map == "elu":
            return mx.where(x > 0, x, mx.expm1(mx.minimum(x, 0.0))) + 1  # elu + 1
        if self.feature_map == "relu":
            return nn.relu(x)
        if self.feature_map == "taylor":
            return taylor_features(x)
        return x

    def _heads(self, x: mx.array) -> mx.array:
        B, S, _ = x.shape
        return x.reshape(B, S, self.num_heads, -1).transpose(0, 2, 1, 3)

    def mix(self, x: mx.array) -> mx.array:
        B, S, _ = x.shape
        q = self._features(self._heads(self.q_proj(x)), "q")
        k = self._features(self._heads(self.k_proj(x)), "k")
        v = self._heads(self.v_proj(x))
        o = linear_attention_chunked(q, k, v, self.eps, self.normalize, self.chunk_size)
        return self.out_proj(o.transpose(0, 2, 1, 3).reshape(B, S, self.value_dim))
