"""MLX twin of :mod:`blocks.slstm`: the sLSTM cell (stabilised exponential gating, headwise
memory mixing) and the xLSTM sLSTM block (post-up-projection, with its gated feed-forward).

Per unit and step, with ``raw = W x_t + R y_{t-1} + b`` split into ĩ, f̃, z̃, õ::

    lf  = m_{t-1} + logsigmoid(f̃);   m_t = max(ĩ, lf)   (m_1 = ĩ)
    i'  = exp(ĩ - m_t);   f' = exp(lf - m_t)
    c_t = f' c_{t-1} + i' tanh(z̃);   n_t = f' n_{t-1} + i';   y_t = sigmoid(õ) c_t / n_t

Layouts as the torch block's: gate order ``[i, f, z, o]``; ``R`` (NH, DH_in, 4, DH_out);
``b`` (4, NH, DH) (gate, head, unit); ĩ, f̃ come from the convolved input, z̃, õ from the
block's normalised input. The scan is a Python loop over steps that MLX differentiates; the
stabiliser ``m`` is held constant for the gradient (``stop_gradient``), which is exact: for
any sequence ``m_t``, c and n both carry the factor ``exp(-m_t)``, so y does not depend on m
(the torch block's hand-written backward does the same).
"""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn

from blocks.mlx.base import Block, small_init, wang_init
from blocks.mlx.mlstm import DepthwiseConv, log_sigmoid
from blocks.registry import register

__all__ = ["SLSTMBlock", "powerlaw_forget_bias", "slstm_scan", "slstm_scan_time_major"]

NUM_GATES = 4  # i, f, z, o


def _state_dtype(dtype: mx.Dtype) -> mx.Dtype:
    return mx.float64 if dtype == mx.float64 else mx.float32


def slstm_scan_time_major(wx_tm: mx.array, R: mx.array, b: mx.array) -> mx.array:
    """The cell over time in the block's layout: ``wx_tm (S, NH, B, 4, DH)`` (gates
    ``[i, f, z, o]``, without bias), ``R (NH, DH, 4, DH)``, ``b`` (4H entries, gate-major)
    -> ``y (S, NH, B, DH)`` in ``wx_tm``'s dtype. States start at zero."""
    S, NH, B, G, DH = wx_tm.shape
    out_dtype, dtype = wx_tm.dtype, _state_dtype(wx_tm.dtype)
    if S == 0:
        return mx.zeros((0, NH, B, DH), dtype=out_dtype)
    bias = b.astype(dtype).reshape(G, NH, DH).swapaxes(0, 1)[:, None]  # (NH, 1, 4, DH)
    raw_x = wx_tm.astype(dtype) + bias
    R_flat = R.astype(dtype).reshape(NH, DH, G * DH)

    def gates(raw: mx.array) -> tuple[mx.array, ...]:
        return tuple(raw[:, :, g] for g in range(G))  # ĩ, f̃, z̃, õ: (NH, B, DH) each

    # first step, no history: m = ĩ, i' = exp(ĩ - m) = 1 (m held), c = i' tanh(z̃), n = i'
    i_raw, _, z_raw, o_raw = gates(raw_x[0])
    m = mx.stop_gradient(i_raw)
    i_gate = mx.exp(i_raw - m)
    c, n = i_gate * mx.tanh(z_raw), i_gate
    y = mx.sigmoid(o_raw) * c / n
    ys = [y]
    for t in range(1, S):
        # memory mixing: each head's previous output feeds its own four gates
        i_raw, f_raw, z_raw, o_raw = gates(raw_x[t] + (y @ R_flat).reshape(NH, B, G, DH))
        lf = m + log_sigmoid(f_raw)
        m = mx.stop_gradient(mx.maximum(i_raw, lf))
        i_gate, f_gate = mx.exp(i_raw - m), mx.exp(lf - m)
        c = f_gate * c + i_gate * mx.tanh(z_raw)
        n = f_gate * n + i_gate
        y = mx.sigmoid(o_raw) * c / n
        ys.append(y)
    return mx.stack(ys).astype(out_dtype)


def slstm_scan(wx: mx.array, R: mx.array, b: mx.array, num_heads: int) -> mx.array:
    """The cell with the torch functions' signature: ``wx (B, S, 4H)`` gate-major
    ``[i | f | z | o]``, each gate head-major; ``R (NH, DH, 4, DH)``; ``b (4H,)`` ->
    ``y (B, S, H)``."""
    B, S, _ = wx.shape
    NH, DH = num_heads, R.shape[1]
    wx_tm = wx.reshape(B, S, NUM_GATES, NH, DH).transpose(1, 3, 0, 2, 4)
    y = slstm_scan_time_major(wx_tm, R, b.reshape(-1))
    return y.transpose(2, 0, 1, 3).reshape(B, S, NH * DH)


def powerlaw_forget_bias(head_dim: int, block_index: int, num_blocks: int) -> mx.array:
    """xLSTM's block-dependent forget-gate bias of one head: ``5 - 12 (j / (DH-1))^(0.3 + 1.3 r)``
    with ``r = block_index / (num_blocks - 1)`` (0 for a single block)."""
    ratio = block_index / (num_blocks - 1) if num_blocks > 1 else 0.0
    position = mx.arange(head_dim, dtype=mx.float32) / max(head_dim - 1, 1)
    return 5.0 - 12.0 * mx.power(position, 0.3 + 1.3 * ratio)


@register("slstm", backend="mlx")
class SLSTMBlock(Block):
    """Twin of :class:`blocks.slstm.SLSTMBlock`: ``x += sLSTM(LN1(x)); x += FFN(LN2(x))``.

    sLSTM layer: ``x_c = SiLU(conv(x))`` (no conv when ``conv_kernel`` is 0); ĩ, f̃ from
    ``x_c`` and z̃, õ from ``x`` through headwise bias-free projections ``w_* (NH, out, in)``;
    the cell; per-head group norm with weight only. FFN: ``down(GELU(gate(u)) * up(u))``.
    """

    torch_name = "slstm"

    def __init__(self, d_model: int, max_len: int, **options):
        super().__init__(d_model, max_len, **options)
        NH, DH = self.num_heads, self.head_dim
        if self.conv_kernel > 0:
            self.conv = DepthwiseConv(d_model, self.conv_kernel)
        self.w_i = small_init((NH, DH, DH), d_model)
        self.w_f = small_init((NH, DH, DH), d_model)
        self.w_z = small_init((NH, DH, DH), d_model)
        self.w_o = small_init((NH, DH, DH), d_model)
        self.R = mx.zeros((NH, DH, NUM_GATES, DH))  # (head, in, gate, out)
        forget = mx.broadcast_to(
            powerlaw_forget_bias(DH, self.block_index, self.num_blocks), (1, NH, DH)
        )
        zeros = mx.zeros((1, NH, DH))
        self.b = mx.concatenate([zeros, forget, zeros, zeros])  # (gate, head, unit)
        self.group_norm_weight = mx.ones((d_model,))

        self.ffn_norm = nn.LayerNorm(d_model, bias=False)
        self.ffn_up = nn.Linear(d_model, 2 * self.ffn_hidden, bias=False)  # [gate | up]
        self.ffn_up.weight = small_init((2 * self.ffn_hidden, d_model), d_model)
        self.ffn_down = nn.Linear(self.ffn_hidden, d_model, bias=False)
        self.ffn_down.weight = wang_init((d_model, self.ffn_hidden), d_model, self.num_blocks)

    def mix(self, x: mx.array) -> mx.array:
        """The sLSTM layer on the normalised input ``x (B, S, d_model)``."""
        B, S, D = x.shape
        NH, DH = self.num_heads, self.head_dim
        x_c = nn.silu(self.conv(x)) if self.conv_kernel > 0 else x
        # headwise projections by (head, out, in) weights, straight into the scan's layout
        # (S, NH, B, gate, DH): ĩ, f̃ from x_c, z̃, õ from x
        w_if = mx.stack([self.w_i, self.w_f], axis=1)  # (NH, 2, out, in)
        w_zo = mx.stack([self.w_z, self.w_o], axis=1)
        wx = mx.concatenate(
            [mx.einsum("bshi,hgoi->shbgo", x_c.reshape(B, S, NH, DH), w_if),
             mx.einsum("bshi,hgoi->shbgo", x.reshape(B, S, NH, DH), w_zo)],
            axis=3,
        )
        y = slstm_scan_time_major(wx, self.R, self.b.reshape(-1))
        # multi-head group norm: each head's units normalised on their own, one weight per unit
        y = mx.fast.layer_norm(y, None, None, 1e-5) * self.group_norm_weight.reshape(NH, 1, DH)
        return y.transpose(2, 0, 1, 3).reshape(B, S, D)

    def ffn(self, u: mx.array) -> mx.array:
        gate, up = mx.split(self.ffn_up(u), 2, axis=-1)
        return self.ffn_down(nn.gelu(gate) * up)

    def __call__(self, x: mx.array) -> mx.array:
        x = x + self.mix(self.norm(x))
        return x + self.ffn(self.ffn_norm(x))
