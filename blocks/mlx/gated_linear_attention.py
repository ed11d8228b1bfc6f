"""MLX twin of :mod:`blocks.gated_linear_attention`: gated linear attention (GLA, Yang et al.
2023)::

    log α_t = logsigmoid(W_α2 W_α1 u_t + b_α) / 16       (per key channel)
    S_t = diag(α_t) S_{t-1} + k_t v_tᵀ,   o_t = (q_t / √d_k)ᵀ S_t
    out = W_o (RMSNorm_head(o) ⊙ SiLU(W_g u))

The cell runs in chunked form (:func:`gla_chunked`): exact intra-chunk scores from
:func:`decayed_scores`, the d_k × d_v state carried between chunks with decays ≤ 1.

:func:`decayed_scores` is the MLX counterpart of :func:`blocks.ops.decayed_scores` (RWKV-6's twin
uses it too): the factored product while every cumulative log decay is within
``DECAY_FACTOR_LIMIT``, the exact per-channel exponentials otherwise, as the torch block decides.
"""

from __future__ import annotations

import math

import mlx.core as mx
import mlx.nn as nn

from blocks.mlx.base import Block, linear, uniform
from blocks.mlx.ops import carry_states, decayed_scores, pad_to_chunks
from blocks.registry import register


def gla_chunked(q: mx.array, k: mx.array, v: mx.array, log_alpha: mx.array, chunk: int = 16,
                factored: bool | None = None) -> mx.array:
    """GLA cell, chunked: ``q, k, log_alpha: (B, H, S, dk)``, ``v: (B, H, S, dv)`` -> ``o: (B, H,
    S, dv)`` with ``o_t = (q_t/√dk)ᵀ S_t``, ``S_t = diag(α_t) S_{t-1} + k_t v_tᵀ``, ``S_0 = 0``.

    With b_t the cumulative log decay from the chunk's start: intra-chunk
    ``Σ_{s≤t} (q_t ⊙ e^{b_t - b_s})·k_s v_s``, plus the entering state read through e^{b_t}."""
    seq, dk = q.shape[2], q.shape[-1]
    q, k, v, log_alpha = pad_to_chunks([q, k, v, log_alpha], chunk)  # padding: no decay, no input
    q = q * dk**-0.5
    b = mx.cumsum(log_alpha, axis=3)
    out = decayed_scores(q, k, b, b, factored=factored) @ v
    b_last = b[:, :, :, -1:]
    chunk_kv = (k * mx.exp(b_last - b)).swapaxes(-1, -2) @ v  # (B, H, nC, dk, dv)
    states = carry_states(chunk_kv, mx.exp(b_last).swapaxes(-1, -2))
    out = out + (q * mx.exp(b)) @ states
    batch, heads, num_chunks, length, dv = out.shape
    return out.reshape(batch, heads, num_chunks * length, dv)[:, :, :seq]


def xavier_uniform(out_dim: int, in_dim: int, gain: float) -> mx.array:
    """Glorot & Bengio (2010): U(-a, a), a = gain · √(6 / (fan_in + fan_out))."""
    return uniform((out_dim, in_dim), gain * math.sqrt(6.0 / (in_dim + out_dim)))


@register("gated_linear_attention", backend="mlx")
class GatedLinearAttentionBlock(Block):
    """x + GLA(LayerNorm(x)); ``gk_proj`` is a list (``gk_proj.0``, ``gk_proj.1``) as torch's
    ``nn.Sequential`` names it."""

    torch_name = "gated_linear_attention"

    def __init__(self, d_model: int, max_len: int, **options):
        super().__init__(d_model, max_len, **options)
        rank = self._reference.gk_proj[0].out_features
        K, V = self.key_dim, self.value_dim
        self.q_proj = nn.Linear(d_model, K, bias=False)
        self.k_proj = nn.Linear(d_model, K, bias=False)
        self.v_proj = nn.Linear(d_model, V, bias=False)
        self.g_proj = nn.Linear(d_model, V, bias=False)
        self.gk_proj = [nn.Linear(d_model, rank, bias=False), linear(rank, K, bias=True)]
        self.o_proj = nn.Linear(V, d_model, bias=False)
        self.g_norm_weight = mx.ones((self.head_v_dim,))
        gain = 2**-2.5  # mad-lab / fla GLA: Xavier uniform on every weight matrix
        for lin in (self.q_proj, self.k_proj, self.v_proj, self.g_proj, self.o_proj,
                    *self.gk_proj):
            lin.weight = xavier_uniform(*lin.weight.shape, gain)

    def _heads(self, x: mx.array) -> mx.array:
        B, S, _ = x.shape
        return x.reshape(B, S, self.num_heads, -1).transpose(0, 2, 1, 3)

    def mix(self, x: mx.array) -> mx.array:
        B, S, _ = x.shape
        q, k, v = (self._heads(proj(x)) for proj in (self.q_proj, self.k_proj, self.v_proj))
        gate_logits = self.gk_proj[1](self.gk_proj[0](x))
        log_alpha = self._heads(nn.log_sigmoid(gate_logits) / self.gate_logit_normalizer)
        o = gla_chunked(q, k, v, log_alpha, chunk=self.chunk_size).transpose(0, 2, 1, 3)
        o = o * mx.rsqrt(mx.mean(o * o, axis=-1, keepdims=True) + self.norm_eps)
        o = (o * self.g_norm_weight).reshape(B, S, self.value_dim) * nn.silu(self.g_proj(x))
        return self.o_proj(o)
