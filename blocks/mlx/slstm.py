"""MLX twin of :mod:`blocks.slstm`: the sLSTM cell (stabilised exponential gating, headwise
memory mixing) and the xLSTM sLSTM block (post-up-projection, with its gated feed-forward).

Per unit and step, with ``raw = W x_t + R y_{t-1} + b`` split into ĩ, f̃, z̃, õ::

    lf  = m_{t-1} + logsigmoid(f̃);   m_t = max(ĩ, lf)   (m_1 = ĩ)
    i'  = exp(ĩ - m_t);   f' = exp(lf - m_t)
    c_t = f' c_{t-1} + i' tanh(z̃);   n_t = f' n_{t-1} + i';   y_t = sigmoid(õ) c_t / n_t

Layouts as the torch block's: gate order ``[i, f, z, o]``; ``R`` (NH, DH_in, 4, DH_out);
``b`` (4, NH, DH) (gate, head, unit); ĩ, f̃ come from the convolved input, z̃, õ from the
block's normalised input.

Two forms of the cell, same inputs and outputs:

- :func:`slstm_scan_time_major_reference`: the equations above as a Python loop over steps that
  MLX differentiates (slow: the graph, and the cost of differentiating it, grow with the
  sequence). The definition the fast path is tested against.
- :func:`slstm_scan_time_major`: the fast path the block uses, an ``mx.custom_function`` like the
  torch block's ``_SLSTMScan``. The forward loop keeps the gates and states; the backward
  through time is the hand-derived recurrence, one matrix product with ``R`` per step, and what
  does not need the recurrence (its per-step factors, the gradient of ``R``) is computed for all
  steps at once.

The output never depends on the stabiliser ``m`` except through rounding (c and n both carry
the factor ``exp(-m_t)``), so both forms hold it constant for the gradient, and the fast path
chooses it differently: ``m_t = max(ĩ, m_{t-1} + min(f̃, 0))``, within log 2 of the definition
above, which needs no logarithm, leaves one of i', f' / sigmoid(|f̃|) exactly 1 and keeps every
exponent at or below zero. In float64 the fast path equals torch's autograd reference to
double rounding (tests/test_mlx_xlstm.py).

Why the fast path looks as it does (MLX's CPU backend on x86, measured): every operation costs
~10 µs of scheduling whatever its size, so a step must be few operations; MLX's exponentials
are scalar loops (``exp``, ``sigmoid``: ~20 ns per element, their polynomial calls a library
``fma`` per term; ``tanh`` ~25, ``erf`` ~40) where libm's ``pow`` takes ~9 ns, so every
exponential here is ``power(2, ·)`` of pre-activations scaled by log2(e) beforehand; and an
``mx.compile``-d step fuses its elementwise maths (~0.5 ns per operation and element) into one
or two kernels. But MLX re-traces, and runs unfused, compiled functions given arrays that a
transformation traces (all of them under ``mx.grad``, and every array created inside a vjp): the
custom function's forward therefore runs on untraced copies of its inputs (:func:`_untraced`),
and its backward, seven plain operations per step, is not compiled. Inside ``mx.compile`` or
``mx.vmap`` there are no values to copy and the forward runs uncompiled (same maths). The first
call on a machine compiles the step's kernels with the C++ compiler (seconds, cached under the
temporary directory); without a compiler MLX runs them uncompiled.

The feed-forward's GELU and the convolution's SiLU are custom functions too (:func:`gelu_gated`,
:func:`silu`): ``power(2, ·)`` for their exponentials and their derivatives kept from the
forward, instead of MLX's ``erf``/``sigmoid`` and autodiff (3-4x faster here).
"""

from __future__ import annotations

import math

import mlx.core as mx
import mlx.nn as nn

from blocks.mlx.base import Block, small_init, wang_init
from blocks.mlx.mlstm import DepthwiseConv, log_sigmoid
from blocks.registry import register

__all__ = [
    "SLSTMBlock",
    "gelu_gated",
    "powerlaw_forget_bias",
    "silu",
    "slstm_scan",
    "slstm_scan_time_major",
    "slstm_scan_time_major_reference",
]

NUM_GATES = 4  # i, f, z, o
_LOG2E = math.log2(math.e)


def _state_dtype(dtype: mx.Dtype) -> mx.Dtype:
    return mx.float64 if dtype == mx.float64 else mx.float32


def _untraced(*arrays: mx.array) -> list[mx.array] | None:
    """Copies of ``arrays`` (their values, evaluated now) that no function transformation
    traces, so that ``mx.compile``-d functions applied to them are traced once and fused; None
    inside ``mx.compile`` or ``mx.vmap``, where arrays have no values yet."""
    try:
        return [mx.array(memoryview(a), dtype=a.dtype) for a in arrays]
    except (RuntimeError, ValueError):  # "[eval] ... during function transformations ..."
        return None


def _exp2(x: mx.array) -> mx.array:
    """2 ** x: libm's ``pow``, ~2x faster than MLX's CPU ``exp`` (whose polynomial calls a
    library ``fma`` per term on x86)."""
    return mx.power(2.0, x)


# --------------------------------------------------------------------------------------------
# the cell, fast path


def _cell(i, f, z, o, m_prev, c_prev, n_prev):
    """One step on pre-activations in base-2 units (natural ones times log2(e), so that every
    exponential is a ``power(2, ·)``), each (1, NH, B, DH); the stabiliser ``m`` is in base-2
    units too. Returns ``y, c, n, m`` and what the backward keeps: ``tanh(z̃)``,
    ``sigmoid(õ)``, ``i'``, ``f'`` and ``sigmoid(f̃)``.

    Every array it returns is used by ``y``'s computation, so ``mx.compile`` fuses the step into
    one or two kernels. ``m_prev = -inf`` is the first step (m = ĩ, i' = 1, f' = 0)."""
    g = m_prev + mx.minimum(f, 0.0)  # m_{t-1} + min(f̃, 0), within log 2 above lf
    m = mx.maximum(i, g)
    i_big = i >= g
    d = _exp2(mx.minimum(i, g) - m)  # the smaller of exp(ĩ - m), exp(g - m); the larger is 1
    i_gate = mx.where(i_big, 1.0, d)
    e_f = _exp2(-mx.abs(f))
    sig_f = 1.0 / (1.0 + e_f)
    sig_f = mx.where(f >= 0, sig_f, e_f * sig_f)
    # exp(lf - m) = exp(g - m) sigmoid(|f̃|), and sigmoid(|f̃|) = max(sig(f̃), 1 - sig(f̃))
    f_gate = mx.where(i_big, d, 1.0) * mx.maximum(sig_f, 1.0 - sig_f)
    e_z = _exp2(-2.0 * mx.abs(z))
    tanh_z = (1.0 - e_z) / (1.0 + e_z)
    tanh_z = mx.where(z >= 0, tanh_z, -tanh_z)
    e_o = _exp2(-mx.abs(o))
    sig_o = 1.0 / (1.0 + e_o)
    sig_o = mx.where(o >= 0, sig_o, e_o * sig_o)
    c = f_gate * c_prev + i_gate * tanh_z
    n = f_gate * n_prev + i_gate
    y = (sig_o * c) / n
    return y, c, n, m, tanh_z, sig_o, i_gate, f_gate, sig_f


def _cell_first(x_t, m_prev, c_prev, n_prev):
    """The first step: ``x_t (1, NH, B, 4DH)``, no recurrent input."""
    return _cell(*mx.split(x_t, NUM_GATES, axis=-1), m_prev, c_prev, n_prev)


def _cell_next(x_t, y_prev, R_flat, m_prev, c_prev, n_prev):
    """A later step: ``x_t + y_{t-1} R`` (one batched product over heads), then the gates."""
    raw = mx.addmm(x_t, y_prev, R_flat)
    return _cell(*mx.split(raw, NUM_GATES, axis=-1), m_prev, c_prev, n_prev)


def _coefficients(y, c, n, tanh_z, sig_o, i_gate, f_gate, sig_f):
    """The backward's per-step factors for all steps at once, from the forward's (S, NH, B, DH)
    arrays, each returned as (S, 6, NH, B, DH).

    With dc, dn the gradients of c_t, n_t and dy the total one of y_t (m held constant), a step
    of the backward through time is::

        dc <- dc f'_{t+1} + dy sig(õ) / n,   dn <- dn f'_{t+1} - dy y / n
        d ĩ = dc tanh(z̃) i' + dn i',         d f̃ = (dc c_{t-1} + dn n_{t-1}) f' (1 - sig(f̃))
        d z̃ = dc i' (1 - tanh²(z̃)),         d õ = dy y (1 - sig(õ))

    Six channels ``w = (dc, dn, dc, dn, dc, dy)`` follow ``w_t = w_{t+1} carry_t + dy_t take_t``
    and the six products ``x_t = k_t w_t`` are the terms of the gradients of (ĩ, ĩ, f̃, f̃, z̃,
    õ): ``d raw_t`` is their sum per gate, and ``R^T d raw_t`` one product with R's gate
    blocks stacked as (i, i, f, f, z, o). ``take`` carries a factor 1 / log2(e), so that
    ``x`` are the gradients of the base-2 pre-activations the scan works on."""
    zero = mx.zeros_like(c[:1])
    c_prev = mx.concatenate([zero, c[:-1]])
    n_prev = mx.concatenate([zero, n[:-1]])
    f_next = mx.concatenate([f_gate[1:], zero])
    d_f = f_gate * (1.0 - sig_f)  # d f' / d f̃
    inv_n = 1.0 / (_LOG2E * n)  # 1 / log2(e): gradients of base-2 pre-activations
    a_c = sig_o * inv_n
    a_n = -y * inv_n
    k = mx.stack([tanh_z * i_gate, i_gate, c_prev * d_f, n_prev * d_f,
                  i_gate * (1.0 - tanh_z * tanh_z), y * (1.0 - sig_o)], axis=1)
    take = mx.stack([a_c, a_n, a_c, a_n, a_c, mx.full(a_c.shape, 1.0 / _LOG2E, a_c.dtype)],
                    axis=1)
    carry = f_next[:, None] * mx.array([1.0, 1.0, 1.0, 1.0, 1.0, 0.0], dtype=c.dtype).reshape(
        1, 6, 1, 1, 1)
    return carry, take, k


_CELLS = (_cell_first, _cell_next)
_COMPILED_CELLS = tuple(mx.compile(fn) for fn in _CELLS)


def _scan_forward(raw_x: mx.array, R: mx.array, compiled: bool) -> tuple[mx.array, ...]:
    """The forward loop -> ``y`` and what the backward keeps, (S, NH, B, DH) each."""
    S, NH, B, GD = raw_x.shape
    DH = GD // NUM_GATES
    first, step = _COMPILED_CELLS if compiled else _CELLS
    R_flat = R.reshape(NH, DH, GD)
    xs = mx.split(raw_x, S, axis=0)
    c = mx.zeros((1, NH, B, DH), dtype=raw_x.dtype)
    m = mx.full((1, NH, B, DH), -math.inf, dtype=raw_x.dtype)
    kept = [[] for _ in range(8)]  # y, c, n, tanh_z, sig_o, i', f', sig_f per step
    y = n = None
    for t in range(S):
        out = first(xs[0], m, c, c) if t == 0 else step(xs[t], y, R_flat, m, c, n)
        y, c, n, m = out[:4]
        for seq, a in zip(kept, out[:3] + out[4:]):
            seq.append(a)
    return tuple(mx.concatenate(seq) for seq in kept)


def _scan_backward(dy_out, R, kept) -> tuple[mx.array, mx.array]:
    """The backward through time (:func:`_coefficients`) -> the gradients of :func:`_scan`'s
    inputs (base-2 units). Seven plain MLX operations per step: ``mx.compile`` cannot help
    inside a vjp, where MLX traces every array and runs compiled functions as they are."""
    NH, DH = R.shape[0], R.shape[1]
    y = kept[0]
    S, _, B, _ = y.shape
    gates = R.reshape(NH, DH, NUM_GATES, DH)
    # (NH, 6 DH_out, DH_in): the R^T blocks of the six channels' gates (i, i, f, f, z, o)
    R6_T = mx.take(gates, mx.array([0, 0, 1, 1, 2, 3]), axis=2)
    R6_T = R6_T.transpose(0, 2, 3, 1).reshape(NH, 6 * DH, DH)
    carry, take, k = (mx.split(a, S, axis=0) for a in _coefficients(*kept))
    dy_out = mx.split(dy_out, S, axis=0)
    x = [None] * S
    w = None
    for t in range(S - 1, -1, -1):
        if t == S - 1:
            dy = dy_out[t]
        else:
            x_next = x[t + 1].transpose(0, 2, 3, 1, 4).reshape(1, NH, B, 6 * DH)
            dy = mx.addmm(dy_out[t], x_next, R6_T)
        w = take[t] * dy if t == S - 1 else w * carry[t] + take[t] * dy
        x[t] = k[t] * w
    x = mx.concatenate(x)  # (S, 6, NH, B, DH)
    d_raw = mx.concatenate([x[:, 0] + x[:, 1], x[:, 2] + x[:, 3], x[:, 4], x[:, 5]], axis=-1)
    # d R[h] = sum over steps and batch of y_{t-1}^T d raw_t
    y_prev = mx.concatenate([mx.zeros_like(y[:1]), y[:-1]])
    d_R = mx.matmul(y_prev.transpose(1, 3, 0, 2).reshape(NH, DH, S * B),
                    d_raw.transpose(1, 0, 2, 3).reshape(NH, S * B, NUM_GATES * DH))
    return d_raw, d_R.reshape(R.shape)


@mx.custom_function
def _scan(raw_x: mx.array, R: mx.array) -> tuple[mx.array, ...]:
    """``raw_x (S, NH, B, 4DH)`` (W x_t + b, gates ``[i|f|z|o]`` along the last axis) and
    ``R (NH, DH, 4, DH)``, both times log2(e) -> ``y`` and what the backward keeps,
    (S, NH, B, DH) each. (Scaling ``raw_x`` in here, before the split, would trip
    ``mx.compile`` when an outer compile traces the function twice, inside and outside
    ``mx.grad``.)"""
    values = _untraced(raw_x, R)
    if values is None:
        return _scan_forward(raw_x, R, compiled=False)
    return _scan_forward(*values, compiled=True)


@_scan.vjp
def _scan_vjp(primals, cotangents, outputs):
    return _scan_backward(cotangents[0], primals[1], outputs)


def slstm_scan_time_major(wx_tm: mx.array, R: mx.array, b: mx.array) -> mx.array:
    """The cell over time in the block's layout: ``wx_tm (S, NH, B, 4, DH)`` (gates
    ``[i, f, z, o]``, without bias), ``R (NH, DH, 4, DH)``, ``b`` (4H entries, gate-major)
    -> ``y (S, NH, B, DH)`` in ``wx_tm``'s dtype. States start at zero. The fast path, with a
    hand-written backward through time; same result as
    :func:`slstm_scan_time_major_reference`."""
    S, NH, B, G, DH = wx_tm.shape
    out_dtype, dtype = wx_tm.dtype, _state_dtype(wx_tm.dtype)
    if S == 0:
        return mx.zeros((0, NH, B, DH), dtype=out_dtype)
    bias = b.astype(dtype).reshape(G, NH, DH).swapaxes(0, 1)[:, None]  # (NH, 1, 4, DH)
    raw_x = ((wx_tm.astype(dtype) + bias) * _LOG2E).reshape(S, NH, B, G * DH)
    return _scan(raw_x, R.astype(dtype) * _LOG2E)[0].astype(out_dtype)


def slstm_scan_time_major_reference(wx_tm: mx.array, R: mx.array, b: mx.array) -> mx.array:
    """:func:`slstm_scan_time_major` as the plain equations, one step at a time, differentiated
    by MLX (slow; the definition the fast path is tested against)."""
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


def slstm_scan(wx: mx.array, R: mx.array, b: mx.array, num_heads: int, *,
               reference: bool = False) -> mx.array:
    """The cell with the torch functions' signature: ``wx (B, S, 4H)`` gate-major
    ``[i | f | z | o]``, each gate head-major; ``R (NH, DH, 4, DH)``; ``b (4H,)`` ->
    ``y (B, S, H)``. ``reference``: the autodiff form instead of the fast path."""
    B, S, _ = wx.shape
    NH, DH = num_heads, R.shape[1]
    wx_tm = wx.reshape(B, S, NUM_GATES, NH, DH).transpose(1, 3, 0, 2, 4)
    scan = slstm_scan_time_major_reference if reference else slstm_scan_time_major
    y = scan(wx_tm, R, b.reshape(-1))
    return y.transpose(2, 0, 1, 3).reshape(B, S, NH * DH)


# --------------------------------------------------------------------------------------------
# the block's elementwise functions: exponentials as power(2, ·), derivatives kept from the
# forward (plain MLX operations; see the module docstring)

_SQRT_HALF = math.sqrt(0.5)
_INV_SQRT_2PI = 1.0 / math.sqrt(2.0 * math.pi)


def _normal_cdf(x: mx.array) -> tuple[mx.array, mx.array]:
    """Phi(x) and the normal density phi(x): erf by Abramowitz & Stegun 7.1.26 (|error| below
    1.5e-7), the approximation MLX's and torch's CPU ``erf`` use; the tail is computed
    directly, not as 1 - (1 - tail)."""
    a = mx.abs(x) * _SQRT_HALF
    t = 1.0 / (1.0 + 0.3275911 * a)
    r = ((((1.061405429 * t - 1.453152027) * t + 1.421413741) * t - 0.284496736) * t
         + 0.254829592)
    e = _exp2(-_LOG2E * (a * a))  # exp(-x² / 2)
    tail = 0.5 * e * t * r  # Phi(-|x|) = (1 - erf(|x| / sqrt 2)) / 2
    return mx.where(x >= 0, 1.0 - tail, tail), e * _INV_SQRT_2PI


@mx.custom_function
def _gelu_gated(a: mx.array, b: mx.array) -> tuple[mx.array, mx.array, mx.array]:
    """``GELU(a) b`` and what the backward needs: ``GELU(a)`` and ``GELU'(a)``."""
    cdf, pdf = _normal_cdf(a)
    gelu = a * cdf
    return gelu * b, gelu, cdf + a * pdf


@_gelu_gated.vjp
def _gelu_gated_vjp(primals, cotangents, outputs):
    _, b = primals
    _, gelu, d_gelu = outputs
    return cotangents[0] * b * d_gelu, cotangents[0] * gelu


@mx.custom_function
def _silu(x: mx.array) -> tuple[mx.array, mx.array]:
    """``x sigmoid(x)`` and its derivative ``sigmoid(x) (1 + x (1 - sigmoid(x)))``."""
    e = _exp2(-_LOG2E * x)  # inf far below zero: sig = 0, and 1 - sig is taken as such
    sig = 1.0 / (1.0 + e)
    return x * sig, sig * (1.0 + x * mx.where(x >= 0, e * sig, 1.0 - sig))


@_silu.vjp
def _silu_vjp(primal, cotangents, outputs):  # one argument: primal is that array, not a tuple
    return cotangents[0] * outputs[1]


def _fast_dtype(*arrays: mx.array) -> bool:
    return all(a.dtype in (mx.float32, mx.float64) for a in arrays)


def gelu_gated(a: mx.array, b: mx.array) -> mx.array:
    """``GELU(a) * b`` (exact GELU, ``nn.gelu``), float32/float64 through the fast path."""
    return _gelu_gated(a, b)[0] if _fast_dtype(a, b) else nn.gelu(a) * b


def silu(x: mx.array) -> mx.array:
    """``x * sigmoid(x)`` (``nn.silu``), float32/float64 through the fast path."""
    return _silu(x)[0] if _fast_dtype(x) else nn.silu(x)


# --------------------------------------------------------------------------------------------
# the block


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
        x_c = silu(self.conv(x)) if self.conv_kernel > 0 else x
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
        return self.ffn_down(gelu_gated(gate, up))

    def __call__(self, x: mx.array) -> mx.array:
        x = x + self.mix(self.norm(x))
        return x + self.ffn(self.ffn_norm(x))
