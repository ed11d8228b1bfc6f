"""MLX twin of :mod:`blocks.mlstm`: the mLSTM cell (recurrent, parallel and chunkwise forms)
and the xLSTM mLSTM block (pre-up-projection).

Per head, with query/key size d, exponential input gate and sigmoid forget gate in log space
(Beck et al. 2024, section 2.3)::

    m_t  = max(log f_t + m_{t-1}, i~_t)                     stabiliser, m_0 = 0
    C_t  = f'_t C_{t-1} + i'_t k_t v_t^T / sqrt(d)          f' = exp(log f_t + m_{t-1} - m_t)
    n_t  = f'_t n_{t-1} + i'_t k_t / sqrt(d)                i' = exp(i~_t - m_t)
    h_t  = C_t^T q_t / (max(|q_t . n_t|, exp(-m_t)) + eps)

Unrolled, ``m_t = max(F_t, max_{j<=t} log D_tj)`` with ``log D_tj = (F_t - F_j) + i~_j`` and
``F`` the cumulative log forget gate; the parallel form is ``H = (Q K^T / sqrt(d) * D') V``
normalised by its row sums, ``D' = exp(log D - m)``. The torch block's speed tricks (the factored
decay and its hand-written ``_CausalReadout``) are left out: here the decay matrix is always
formed and MLX's autodiff does the backward. ``F_t - F_j`` is never a difference of two
cumulative sums (imprecise in float32 on long sequences, which is why the torch block sums in
float64): it is summed directly over ``j < s <= t`` (:func:`segment_sums`). Gate maths and
states run in float32 (float64 arrays stay float64, but MLX's CPU exponentials are only
float32-accurate there).
"""

from __future__ import annotations

import math

import mlx.core as mx
import mlx.nn as nn

from blocks.mlx.base import Block, conv_weight, normal, small_init, wang_init
from blocks.mlx.ops import causal_depthwise_conv
from blocks.registry import register

__all__ = ["MLSTMBlock", "mlstm_chunkwise", "mlstm_parallel", "mlstm_recurrent", "segment_sums"]


# --------------------------------------------------------------------------------------------
# helpers shared by the forms


def _state_dtype(dtype: mx.Dtype) -> mx.Dtype:
    """Gate maths and states never run below float32 (float64 stays float64)."""
    return mx.float64 if dtype == mx.float64 else mx.float32


def log_sigmoid(x: mx.array) -> mx.array:
    """log sigmoid(x) = -log(1 + exp(-x)), without overflow."""
    return -mx.logaddexp(-x, 0.0)


def _inverse_normaliser(qn: mx.array, m: mx.array, eps: float) -> mx.array:
    """``1 / (max(|qn|, exp(-m)) + eps)``, numerator and denominator multiplied by
    ``exp(min(m, 0))`` so that no exponential overflows (as the torch block)."""
    scale = mx.exp(mx.minimum(m, 0.0))
    return scale / (mx.maximum(mx.abs(qn) * scale, mx.exp(-mx.maximum(m, 0.0))) + eps * scale)


def _causal(size: int, strict: bool = False) -> mx.array:
    """(size, size) boolean: True on and below the diagonal (strictly below when ``strict``)."""
    return mx.tril(mx.ones((size, size), dtype=mx.bool_), k=-1 if strict else 0)


def segment_sums(x: mx.array) -> mx.array:
    """``(..., L) -> (..., L, L)``: entry ``[t, j] = sum_{j < s <= t} x_s`` for ``j <= t`` (0 on
    the diagonal), summed directly rather than as ``cumsum_t - cumsum_j``; 0 above the
    diagonal (callers mask it)."""
    size = x.shape[-1]
    below = mx.where(_causal(size, strict=True), x[..., :, None], 0.0)  # [s, j] = x_s if s > j
    return mx.cumsum(below, axis=-2)


def _stabilised_decay(
    log_f: mx.array, i_pre: mx.array, m_start: mx.array | None = None
) -> tuple[mx.array, mx.array, mx.array]:
    """The parallel form's decay over the last axis, divided by ``exp(m_t)``.

    With ``b_t = sum_{s<=t} log f_s`` and a state entering with stabiliser ``m_start`` (0 at a
    sequence's start): ``log D_tj = (b_t - b_j) + i~_j`` for ``j <= t``, the entering state's log
    weight ``b_t + m_start``, and ``m_t = max(b_t + m_start, max_j log D_tj)``.

    Returns ``(exp(log D - m) (..., L, L), exp(b + m_start - m) (..., L), m (..., L))``.
    """
    size = log_f.shape[-1]
    log_d = mx.where(_causal(size), segment_sums(log_f) + i_pre[..., None, :], -math.inf)
    log_start = mx.cumsum(log_f, axis=-1)
    if m_start is not None:
        log_start = log_start + m_start[..., None]
    m = mx.maximum(log_start, mx.max(log_d, axis=-1))
    return mx.exp(log_d - m[..., None]), mx.exp(log_start - m), m


# --------------------------------------------------------------------------------------------
# the three forms of the cell (shapes as the torch functions)


def mlstm_recurrent(
    q: mx.array, k: mx.array, v: mx.array, i_preact: mx.array, f_preact: mx.array,
    eps: float = 1e-6,
) -> mx.array:
    """The cell's equations one step at a time (the readable reference; O(S) steps).

    q, k (B, NH, S, DQK); v (B, NH, S, DV); i_preact, f_preact (B, NH, S) -> h (B, NH, S, DV)
    in q's dtype.
    """
    out_dtype, dtype = q.dtype, _state_dtype(q.dtype)
    q, k, v = q.astype(dtype), k.astype(dtype), v.astype(dtype)
    i_pre, log_f = i_preact.astype(dtype), log_sigmoid(f_preact.astype(dtype))
    B, NH, S, DQK = q.shape
    k = k / math.sqrt(DQK)
    C = mx.zeros((B, NH, DQK, v.shape[-1]), dtype=dtype)
    n = mx.zeros((B, NH, DQK), dtype=dtype)
    m = mx.zeros((B, NH), dtype=dtype)
    hs = []
    for t in range(S):
        m_new = mx.maximum(log_f[..., t] + m, i_pre[..., t])  # m_t
        f_gate = mx.exp(log_f[..., t] + m - m_new)  # f'_t
        i_gate = mx.exp(i_pre[..., t] - m_new)  # i'_t
        k_t, v_t, q_t = k[..., t, :], v[..., t, :], q[..., t, :]
        kv_t = k_t[..., :, None] * v_t[..., None, :]
        C = f_gate[..., None, None] * C + i_gate[..., None, None] * kv_t
        n = f_gate[..., None] * n + i_gate[..., None] * k_t
        m = m_new
        h_num = (q_t[..., None, :] @ C)[..., 0, :]  # C_t^T q_t
        qn = (q_t * n).sum(axis=-1)
        hs.append(h_num * _inverse_normaliser(qn, m, eps)[..., None])
    if not hs:
        return mx.zeros((B, NH, 0, v.shape[-1]), dtype=out_dtype)
    return mx.stack(hs, axis=-2).astype(out_dtype)


def mlstm_parallel(
    q: mx.array, k: mx.array, v: mx.array, i_preact: mx.array, f_preact: mx.array,
    eps: float = 1e-6,
) -> mx.array:
    """The quadratic parallel form: ``C~ = (Q K^T / sqrt(d)) * exp(log D - m)``,
    ``H = C~ V / (max(|C~ 1|, exp(-m)) + eps)``. Shapes as :func:`mlstm_recurrent`."""
    out_dtype, dtype = q.dtype, _state_dtype(q.dtype)
    q, k, v = q.astype(dtype), k.astype(dtype), v.astype(dtype)
    decay, _, m = _stabilised_decay(log_sigmoid(f_preact.astype(dtype)), i_preact.astype(dtype))
    scores = ((q * q.shape[-1] ** -0.5) @ k.swapaxes(-1, -2)) * decay
    h_num, qn = scores @ v, scores.sum(axis=-1)  # qn = q_t . n_t at the stabilised scale
    return (h_num * _inverse_normaliser(qn, m, eps)[..., None]).astype(out_dtype)


def mlstm_chunkwise(
    q: mx.array, k: mx.array, v: mx.array, i_preact: mx.array, f_preact: mx.array,
    eps: float = 1e-6, chunk_size: int = 64,
) -> mx.array:
    """Chunkwise form: the parallel form inside chunks of ``chunk_size`` steps plus the state
    entering each chunk, itself the parallel form one level up (over chunks, with the chunks'
    summed ``k v^T`` as inputs and their total log forget gates as decays). A short last chunk
    is padded at the end (f = 1, i~ = 0), which no earlier step sees. Shapes as
    :func:`mlstm_recurrent`.
    """
    B, NH, S, DQK = q.shape
    L = max(1, min(int(chunk_size), S))
    NC = -(-S // L)
    if NC == 1:
        return mlstm_parallel(q, k, v, i_preact, f_preact, eps)
    out_dtype, dtype = q.dtype, _state_dtype(q.dtype)
    DV, pad = v.shape[-1], NC * L - S

    q = q.astype(dtype) * DQK**-0.5
    k, v = k.astype(dtype), v.astype(dtype)
    i_pre, log_f = i_preact.astype(dtype), log_sigmoid(f_preact.astype(dtype))
    if pad:
        q, k, v = (mx.pad(t, [(0, 0), (0, 0), (0, pad), (0, 0)]) for t in (q, k, v))
        i_pre, log_f = (mx.pad(t, [(0, 0), (0, 0), (0, pad)]) for t in (i_pre, log_f))
    q, k = q.reshape(B, NH, NC, L, DQK), k.reshape(B, NH, NC, L, DQK)
    v = v.reshape(B, NH, NC, L, DV)
    i_pre, log_f = i_pre.reshape(B, NH, NC, L), log_f.reshape(B, NH, NC, L)

    # What chunk c adds to the state, stabilised by its own max m_loc: input j's log weight at
    # the chunk's end is a_j = sum_{s > j} log f_s + i~_j (a suffix sum, summed directly).
    a = mx.cumsum(log_f, axis=-1, reverse=True, inclusive=False) + i_pre
    m_loc = mx.max(a, axis=-1)  # (B, NH, NC)
    k_weighted = k * mx.exp(a - m_loc[..., None])[..., None]
    kv = k_weighted.swapaxes(-1, -2) @ v  # (B, NH, NC, DQK, DV)
    kn = k_weighted.sum(axis=-2)  # (B, NH, NC, DQK)

    # State entering chunk c: sources s = 0 (the zero initial state, log weight 0) and s >= 1
    # (chunk s - 1, log weight m_loc), decayed by the total log forget gates x_r of the chunks
    # in between: log W_cs = sum_{s < r <= c} x_r + src_m_s, m_prev_c = max_{s<=c} log W_cs.
    zero = mx.zeros((B, NH, 1), dtype=dtype)
    x = mx.concatenate([zero, log_f.sum(axis=-1)[..., :-1]], axis=-1)
    src_m = mx.concatenate([zero, m_loc[..., :-1]], axis=-1)
    log_w = mx.where(_causal(NC), segment_sums(x) + src_m[..., None, :], -math.inf)
    m_prev = mx.max(log_w, axis=-1)  # (B, NH, NC)
    w_src = mx.exp(log_w[..., 1:] - m_prev[..., None])  # the zero state drops out
    C_prev = (w_src @ kv[:, :, :-1].reshape(B, NH, NC - 1, DQK * DV)).reshape(B, NH, NC, DQK, DV)
    n_prev = w_src @ kn[:, :, :-1]  # (B, NH, NC, DQK)

    # Inside each chunk: the parallel form plus the entering state, read with weight w_start.
    decay, w_start, m = _stabilised_decay(log_f, i_pre, m_prev)
    scores = (q @ k.swapaxes(-1, -2)) * decay
    q_start = q * w_start[..., None]
    h_num = scores @ v + q_start @ C_prev
    qn = scores.sum(axis=-1) + (q_start * n_prev[..., None, :]).sum(axis=-1)
    h = h_num * _inverse_normaliser(qn, m, eps)[..., None]
    return h.reshape(B, NH, NC * L, DV)[:, :, :S].astype(out_dtype)


CELL_FNS = {"parallel": mlstm_parallel, "chunkwise": mlstm_chunkwise, "recurrent": mlstm_recurrent}


# --------------------------------------------------------------------------------------------
# the block


class DepthwiseConv(nn.Module):
    """Holder of a causal depthwise convolution's ``weight`` (C, 1, K) and ``bias`` (C,) in
    torch's ``nn.Conv1d`` layout and initialisation."""

    def __init__(self, channels: int, kernel: int):
        super().__init__()
        self.weight, self.bias = conv_weight(channels, kernel)

    def __call__(self, x: mx.array) -> mx.array:
        return causal_depthwise_conv(x, self.weight, self.bias)


class HeadwiseLinear(nn.Module):
    """Block-diagonal linear map, no bias: ``dim / block`` independent ``block x block``
    matrices, ``weight`` (num_blocks, out, in) as the torch block's; small init over
    ``init_dim``."""

    def __init__(self, dim: int, block: int, init_dim: int):
        super().__init__()
        self.weight = small_init((dim // block, block, block), init_dim)

    def __call__(self, x: mx.array) -> mx.array:
        """(..., dim) -> (..., dim): ``y[.., g, o] = sum_i weight[g, o, i] x[.., g, i]``."""
        groups, block, _ = self.weight.shape
        xg = x.reshape(*x.shape[:-1], groups, block)
        return mx.einsum("...gi,goi->...go", xg, self.weight).reshape(x.shape)


@register("mlstm", backend="mlx")
class MLSTMBlock(Block):
    """Twin of :class:`blocks.mlstm.MLSTMBlock`::

        x_m, z  = split(proj_up(x));   x_c = SiLU(causal depthwise conv(x_m))
        q, k, v = headwise(x_c), headwise(x_c), headwise(x_m)
        i~, f~  = igate([q, k, v]), fgate([q, k, v])           one value per head and step
        out     = proj_down((GroupNorm_heads(cell(q, k, v, i~, f~)) * w + skip * x_c) * SiLU(z))

    ``cell`` "auto" follows the torch block's rule for CPU (``cell_for``): parallel up to
    ``AUTO_PARALLEL_MAX_CHUNKS * chunk_size`` steps, chunkwise beyond (the forms agree to
    rounding; only speed differs).
    """

    torch_name = "mlstm"

    def __init__(self, d_model: int, max_len: int, **options):
        super().__init__(d_model, max_len, **options)
        inner, NH = self.inner_dim, self.num_heads
        block = self._reference.q_proj.block
        self.proj_up = nn.Linear(d_model, 2 * inner, bias=False)
        self.proj_up.weight = small_init((2 * inner, d_model), d_model)
        self.conv1d = DepthwiseConv(inner, self.conv_kernel)
        # official init: small init over the embedding size, not the block's
        self.q_proj = HeadwiseLinear(inner, block, d_model)
        self.k_proj = HeadwiseLinear(inner, block, d_model)
        self.v_proj = HeadwiseLinear(inner, block, d_model)
        self.igate = nn.Linear(3 * inner, NH)
        self.igate.weight = mx.zeros((NH, 3 * inner))
        self.igate.bias = normal((NH,), 0.1)
        self.fgate = nn.Linear(3 * inner, NH)
        self.fgate.weight = mx.zeros((NH, 3 * inner))
        self.fgate.bias = mx.linspace(3.0, 6.0, NH)
        self.outnorm_weight = mx.ones((inner,))
        self.learnable_skip = mx.ones((inner,))
        self.proj_down = nn.Linear(inner, d_model, bias=False)
        self.proj_down.weight = wang_init((d_model, inner), d_model, self.num_blocks)

    def cell_for(self, seq_len: int) -> str:
        """The cell form used for ``seq_len`` steps (the torch block's CPU rule)."""
        return self._reference.cell_for(seq_len, "cpu")

    def mix(self, x: mx.array) -> mx.array:
        B, S, _ = x.shape
        NH, DH, inner = self.num_heads, self.head_dim, self.inner_dim
        x_m, z = mx.split(self.proj_up(x), 2, axis=-1)
        x_c = nn.silu(self.conv1d(x_m))
        q, k, v = self.q_proj(x_c), self.k_proj(x_c), self.v_proj(x_m)
        qkv = mx.concatenate([q, k, v], axis=-1)
        i_pre = self.igate(qkv).swapaxes(1, 2)  # (B, NH, S)
        f_pre = self.fgate(qkv).swapaxes(1, 2)

        def heads(t: mx.array) -> mx.array:
            return t.reshape(B, S, NH, DH).transpose(0, 2, 1, 3)

        cell = self.cell_for(S)
        kwargs = {"chunk_size": self.chunk_size} if cell == "chunkwise" else {}
        h = CELL_FNS[cell](heads(q), heads(k), heads(v), i_pre, f_pre, **kwargs)
        # multi-head group norm: each head normalised on its own, one weight per channel
        h = mx.fast.layer_norm(h, None, None, 1e-5).transpose(0, 2, 1, 3).reshape(B, S, inner)
        h = (h * self.outnorm_weight + self.learnable_skip * x_c) * nn.silu(z)
        return self.proj_down(h)
