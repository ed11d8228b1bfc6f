"""MLX twins of :mod:`blocks.hyena`: Hyena (Poli et al. 2023) and multi-head Hyena (MAD, Poli
et al. 2024).

With u the normed input, D the inner width and N the order::

    x_0, ..., x_{N-1}, v = split(shortconv(tile(W_in u)))
    v <- h_o * (v x_{N-1-o}) + b_o (v x_{N-1-o})      o = 0 ... N-2 (causal FFT long conv)
    y = W_out (v x_0)

and, for multi-head Hyena (q, v, k split into heads of head_dim channels)::

    y_t = sum_{s<=t} h[t-s] (q_t . k_s) v_s + b (q_t . k_t) v_t        per head

The long filters h are implicit (safari's HyenaFilter): a sine-activated FFN over positional
features of t, times an exponential decay window. Activations stay channels-last (B, S, C)
throughout; the FFT runs along the time axis.
"""

from __future__ import annotations

import inspect
import math

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from blocks.hyena import DECAY_FAST_PCT, DECAY_SLOW_PCT, DECAY_TARGET
from blocks.hyena import ImplicitFilter as _TorchImplicitFilter
from blocks.mlx.base import Block, linear, normal, small_init, wang_init
from blocks.mlx.short_conv import DepthwiseConv1d
from blocks.registry import register

# the sine frequency the torch filter starts from (its ``w``; the blocks keep the default)
_FILTER_W = inspect.signature(_TorchImplicitFilter).parameters["w"].default


def fft_causal_conv(u: mx.array, k: mx.array, axis: int = -2) -> mx.array:
    """y_t = sum_{s<=t} k_{t-s} u_s along ``axis`` (time, length S in both; the other axes
    broadcast), as an FFT product with both signals zero-padded to 2S: a linear convolution,
    not a circular one."""
    seq_len = u.shape[axis]
    n = 2 * seq_len
    y = mx.fft.irfft(mx.fft.rfft(u, n=n, axis=axis) * mx.fft.rfft(k, n=n, axis=axis), n=n,
                     axis=axis)
    return mx.split(y, [seq_len], axis=axis)[0]


def heads_long_conv_fft(q, k, v, h, bias):
    """Multi-head Hyena's operator as a long convolution of the outer products k_s v_s^T.

    ``q, k, v: (B, S, H, hd)``, ``h: (S, H)``, ``bias: (H,)`` or None -> ``(B, S, H, hd)``.
    Memory ~ B S H hd^2.
    """
    kv = k[..., :, None] * v[..., None, :]  # (B, S, H, hd_k, hd_v)
    y = fft_causal_conv(kv, h[:, :, None, None], axis=-4)
    if bias is not None:
        y = y + bias[:, None, None] * kv
    return (q[..., :, None] * y).sum(-2)


def heads_long_conv_quadratic(q, k, v, h, bias):
    """The same operator as :func:`heads_long_conv_fft`, as attention with a Toeplitz mask:
    scores[t, s] = (q_t . k_s) (h[t - s] [s <= t] + b [s == t]). Memory ~ B H S^2."""
    seq_len = q.shape[1]
    pos = mx.arange(seq_len)
    lag = pos[:, None] - pos[None, :]
    toeplitz = mx.take(h.T, mx.maximum(lag, 0), axis=1) * (lag >= 0)  # (H, S, S)
    if bias is not None:
        toeplitz = toeplitz + bias[:, None, None] * mx.eye(seq_len)
    q, k, v = (a.transpose(0, 2, 1, 3) for a in (q, k, v))  # (B, H, S, hd)
    scores = (q @ k.swapaxes(-1, -2)) * toeplitz
    return (scores @ v).transpose(0, 2, 1, 3)


def _positional_tables(channels: int, max_len: int, emb_dim: int):
    """The filter's fixed inputs, computed in float64 as the torch filter does, stored float32:
    z (L, emb_dim) = [t/(L-1), cos(f_b w_t), -sin(f_b w_t)] with w_t = 2 pi t / L; t (L, 1) =
    t/(L-1); deltas (C,) = |linspace(ln(target)/1.5, ln(target)/0.3)| (decay rates)."""
    t_unit = np.linspace(0.0, 1.0, max_len)
    bands = (emb_dim - 1) // 2
    freqs = np.linspace(1e-4, bands - 1, bands)
    phase = (2 * math.pi * np.arange(max_len) / max_len)[:, None] * freqs
    z = np.concatenate([t_unit[:, None], np.cos(phase), -np.sin(phase)], axis=-1)
    max_decay = math.log(DECAY_TARGET) / DECAY_FAST_PCT
    min_decay = math.log(DECAY_TARGET) / DECAY_SLOW_PCT
    deltas = np.abs(np.linspace(min_decay, max_decay, channels))
    return tuple(mx.array(a, dtype=mx.float32) for a in (z, t_unit[:, None], deltas))


class ImplicitFilter(nn.Module):
    """Hyena's implicit long filter (twin of :class:`blocks.hyena.ImplicitFilter`):
    ``__call__(S) -> (S, C)`` (time first, channels last).

    h = FFN(z_t) * exp(-t/(L-1) |delta_c|), FFN = Linear -> sin -> [Linear -> sin] * depth ->
    Linear (no bias), every sine sin(freq * .) sharing the trainable frequency vector ``freq``.
    The positional tables are constants held outside the module's parameter tree.
    """

    def __init__(self, channels: int, max_len: int, *, width: int, emb_dim: int, depth: int,
                 modulate: bool):
        super().__init__()
        self.modulate = modulate
        object.__setattr__(self, "_tables", _positional_tables(channels, max_len, emb_dim))
        self.inp = linear(emb_dim, width)
        self.hidden = [linear(width, width) for _ in range(depth)]
        self.out = linear(width, channels, bias=False)
        self.freq = mx.full((width,), float(_FILTER_W))
        for lin in (self.inp, *self.hidden):  # mad-lab zeroes every Linear bias at init
            lin.bias = mx.zeros_like(lin.bias)

    def __call__(self, seq_len: int) -> mx.array:
        z, t, deltas = self._tables
        a = mx.sin(self.freq * self.inp(z[:seq_len]))
        for lin in self.hidden:
            a = mx.sin(self.freq * lin(a))
        filt = self.out(a)
        if self.modulate:
            filt = filt * mx.exp(-t[:seq_len] * deltas)
        return filt


class _HyenaBase(Block):
    """In-projection (tied groups), short causal depthwise conv, implicit filter, out-projection;
    sizes read off the torch reference block."""

    def __init__(self, d_model: int, max_len: int, **options):
        super().__init__(d_model, max_len, **options)
        ref = self._reference
        width = ref.short_filter.in_channels  # num_projections * inner
        self.in_proj = linear(d_model, width // self.proj_groups)
        self.in_proj.weight = small_init(self.in_proj.weight.shape, d_model)
        self.in_proj.bias = mx.zeros_like(self.in_proj.bias)
        self.short_filter = DepthwiseConv1d(width, self.short_filter_order)
        f = ref.filter
        self.filter = ImplicitFilter(
            f.out.out_features, max_len, width=f.inp.out_features, emb_dim=f.inp.in_features,
            depth=len(f.hidden), modulate=f.modulate,
        )
        if ref.filter_bias is not None:
            self.filter_bias = normal((f.out.out_features,), 1.0)
        self.out_proj = linear(self.inner, d_model)
        self.out_proj.weight = wang_init((d_model, self.inner), self.inner, self.num_blocks)
        self.out_proj.bias = mx.zeros_like(self.out_proj.bias)

    def _projections(self, u: mx.array) -> mx.array:
        """(B, S, d_model) -> (B, S, num_projections * inner) after the short causal conv."""
        p = self.in_proj(u)
        if self.proj_groups > 1:
            p = mx.tile(p, (1, 1, self.proj_groups))
        return self.short_filter(p)


@register("hyena", backend="mlx")
class HyenaBlock(_HyenaBase):
    """x + Hyena(LayerNorm(x)): order-N gated long convolutions with implicit filters."""

    torch_name = "hyena"

    def mix(self, x: mx.array) -> mx.array:
        seq_len = x.shape[1]
        *gates, v = mx.split(self._projections(x), self.order + 1, axis=-1)  # each (B, S, D)
        h = self.filter(seq_len).reshape(seq_len, self.order - 1, self.inner)
        bias = self.filter_bias
        if bias is not None:
            bias = bias.reshape(self.order - 1, self.inner)
        for o, gate in enumerate(reversed(gates[1:])):
            v = v * gate
            conv = fft_causal_conv(v, h[:, o])
            v = conv if bias is None else conv + bias[o] * v
        return self.out_proj(v * gates[0])


@register("mh_hyena", backend="mlx")
class MultiHeadHyenaBlock(_HyenaBase):
    """x + MultiHeadHyena(LayerNorm(x)): per-head long conv of k v^T read out by q; like the torch
    block, the Toeplitz (quadratic) form up to S = 2 head_dim^2, the FFT form beyond."""

    torch_name = "mh_hyena"

    def mix(self, x: mx.array) -> mx.array:
        B, seq_len, _ = x.shape
        shape = (B, seq_len, self.num_heads, self.head_dim)
        q, v, k = (p.reshape(shape) for p in mx.split(self._projections(x), 3, axis=-1))
        h = self.filter(seq_len)  # (S, H)
        if seq_len <= 2 * self.head_dim**2:
            y = heads_long_conv_quadratic(q, k, v, h, self.filter_bias)
        else:
            y = heads_long_conv_fft(q, k, v, h, self.filter_bias)
        return self.out_proj(y.reshape(B, seq_len, self.inner))
