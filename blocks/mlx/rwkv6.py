"""MLX twin of :mod:`blocks.rwkv6`: RWKV-6 "Finch" time mixing (Peng et al. 2024).

Data-dependent token shift (ddlerp) and decay::

    Δx_t = x_{t-1} - x_t;   m_* = tanh((x_t + μ_x ⊙ Δx_t) W_1) W_2,*   (* in w, k, v, r, g)
    x_*  = x_t + (μ_* + m_*) ⊙ Δx_t
    r, k, v = W_r x_r, W_k x_k, W_v x_v;   g = SiLU(W_g x_g)
    w_t  = exp(-exp(d + tanh(x_w D_1) D_2))

and per head the wkv cell with the bonus u (``time_faaaa``) on the current token::

    y_t = r_tᵀ (S_{t-1} + diag(u) k_t v_tᵀ);   S_t = diag(w_t) S_{t-1} + k_t v_tᵀ
    out = W_o (GroupNorm_heads(y) ⊙ g)

The layer-dependent initialisation of μ, d and u (RWKV-LM) is the torch block's, value for value.
"""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn

from blocks.mlx.base import Block, small_init, uniform, wang_init
from blocks.mlx.ops import carry_states, decayed_scores, pad_to_chunks
from blocks.registry import register

BRANCHES = 5  # w, k, v, r, g


def wkv6_chunked(r: mx.array, k: mx.array, v: mx.array, log_w: mx.array, u: mx.array,
                 chunk: int = 16, factored: bool | None = None) -> mx.array:
    """wkv cell, chunked: ``r, k, log_w: (B, H, S, N)``, ``v: (B, H, S, Nv)``, ``u: (H, N)`` ->
    ``y: (B, H, S, Nv)``; the state starts at zero.

    With b_t the cumulative log decay from the chunk's start through t, y_t reads earlier
    tokens of its chunk through e^{b_{t-1} - b_s} (strictly lower triangle), itself through the
    bonus u, and the entering state through e^{b_{t-1}}."""
    seq = r.shape[2]
    r, k, v, log_w = pad_to_chunks([r, k, v, log_w], chunk)  # padding: no decay, no input
    b = mx.cumsum(log_w, axis=3)
    b_read = mx.pad(b[:, :, :, :-1], [(0, 0), (0, 0), (0, 0), (1, 0), (0, 0)])  # through t - 1
    bonus = (r * u[None, :, None, None] * k).sum(-1, keepdims=True) * v
    out = decayed_scores(r, k, b_read, b, strict=True, factored=factored) @ v + bonus
    b_last = b[:, :, :, -1:]
    chunk_kv = (k * mx.exp(b_last - b)).swapaxes(-1, -2) @ v  # (B, H, nC, N, Nv)
    states = carry_states(chunk_kv, mx.exp(b_last).swapaxes(-1, -2))
    out = out + (r * mx.exp(b_read)) @ states
    batch, heads, num_chunks, length, nv = out.shape
    return out.reshape(batch, heads, num_chunks * length, nv)[:, :, :seq]


class HeadGroupNorm(nn.Module):
    """``nn.GroupNorm(num_heads, dim_att)`` on (..., dim_att): each head's channels normalised to
    zero mean and unit (biased) variance, then an affine map per channel."""

    def __init__(self, groups: int, dims: int, eps: float):
        super().__init__()
        self.groups, self.eps = groups, eps
        self.weight = mx.ones((dims,))
        self.bias = mx.zeros((dims,))

    def __call__(self, x: mx.array) -> mx.array:
        grouped = x.reshape(*x.shape[:-1], self.groups, -1)
        mean = grouped.mean(-1, keepdims=True)
        var = mx.square(grouped - mean).mean(-1, keepdims=True)
        normed = ((grouped - mean) * mx.rsqrt(var + self.eps)).reshape(x.shape)
        return normed * self.weight + self.bias


@register("rwkv6", backend="mlx")
class RWKV6Block(Block):
    """x + RWKV6TimeMix(LayerNorm(x))."""

    torch_name = "rwkv6"

    def __init__(self, d_model: int, max_len: int, **options):
        super().__init__(d_model, max_len, **options)
        ref = self._reference
        d, A, N = d_model, self.dim_att, self.head_dim
        E1 = ref.time_maa_w1.shape[1] // BRANCHES
        E2 = ref.time_decay_w1.shape[1]

        # RWKV-LM's layer-dependent initialisation, as the torch block computes it (float32)
        r01 = self.block_index / (self.num_blocks - 1) if self.num_blocks > 1 else 0.0
        r10 = 1.0 - self.block_index / self.num_blocks
        ddd = (mx.arange(d, dtype=mx.float32) / d).reshape(1, 1, d)
        self.time_maa_x = 1.0 - mx.power(ddd, r10)
        self.time_maa_w = 1.0 - mx.power(ddd, r10)
        self.time_maa_k = 1.0 - mx.power(ddd, r10)
        self.time_maa_v = 1.0 - (mx.power(ddd, r10) + 0.3 * r01)
        self.time_maa_r = 1.0 - mx.power(ddd, 0.5 * r10)
        self.time_maa_g = 1.0 - mx.power(ddd, 0.5 * r10)
        self.time_maa_w1 = uniform((d, BRANCHES * E1), 1e-4)
        self.time_maa_w2 = uniform((BRANCHES, E1, d), 1e-4)
        n = mx.arange(A, dtype=mx.float32) / max(A - 1, 1)
        self.time_decay = (-6 + 5 * mx.power(n, 0.7 + 1.3 * r01)).reshape(1, 1, A)
        self.time_decay_w1 = uniform((d, E2), 1e-4)
        self.time_decay_w2 = uniform((E2, A), 1e-4)
        zigzag = ((mx.arange(A) + 1) % 3 - 1).astype(mx.float32) * 0.1
        self.time_faaaa = (r01 * (1 - n) + zigzag).reshape(self.num_heads, N)

        self.receptance = nn.Linear(d, A, bias=False)
        self.key = nn.Linear(d, A, bias=False)
        self.value = nn.Linear(d, A, bias=False)
        self.gate = nn.Linear(d, A, bias=False)
        self.output = nn.Linear(A, d, bias=False)
        self.ln_x = HeadGroupNorm(self.num_heads, A, ref.ln_x.eps)
        for lin in (self.receptance, self.key, self.value, self.gate):
            lin.weight = small_init((A, d), d)
        self.output.weight = wang_init((d, A), d, self.num_blocks)

    def _heads(self, x: mx.array) -> mx.array:
        B, S, _ = x.shape
        return x.reshape(B, S, self.num_heads, self.head_dim).transpose(0, 2, 1, 3)

    def mix(self, x: mx.array) -> mx.array:
        B, S, d = x.shape
        dx = mx.pad(x[:, :-1], [(0, 0), (1, 0), (0, 0)]) - x  # x_{t-1} - x_t, x_{-1} = 0
        lora = mx.tanh((x + dx * self.time_maa_x) @ self.time_maa_w1)  # (B, S, 5 E1)
        lora = lora.reshape(B, S, BRANCHES, -1).transpose(2, 0, 1, 3)  # (5, B, S, E1)
        shifts = lora @ self.time_maa_w2[:, None]  # (5, B, S, d)
        mw, mk, mv, mr, mg = (shifts[i] for i in range(BRANCHES))
        xw = x + dx * (self.time_maa_w + mw)
        xk = x + dx * (self.time_maa_k + mk)
        xv = x + dx * (self.time_maa_v + mv)
        xr = x + dx * (self.time_maa_r + mr)
        xg = x + dx * (self.time_maa_g + mg)

        r, k, v = self.receptance(xr), self.key(xk), self.value(xv)
        g = nn.silu(self.gate(xg))
        decay = self.time_decay + mx.tanh(xw @ self.time_decay_w1) @ self.time_decay_w2
        log_w = -mx.exp(decay)  # log w_t, w_t in (0, 1)
        y = wkv6_chunked(self._heads(r), self._heads(k), self._heads(v), self._heads(log_w),
                         self.time_faaaa, chunk=self.chunk_size)
        y = self.ln_x(y.transpose(0, 2, 1, 3).reshape(B, S, self.dim_att))
        return self.output(y * g)
