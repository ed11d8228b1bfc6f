"""The mLSTM: matrix-memory LSTM cell (three equivalent forms) and the xLSTM mLSTM block.

Beck et al. 2024, "xLSTM: Extended Long Short-Term Memory", section 2.3 and appendix. Per head,
with query/key size d, exponential input gate and sigmoid forget gate (kept in log space):

    m_t = max(log f_t + m_{t-1}, i~_t)                      stabiliser, m_0 = 0
    f'_t = exp(log f_t + m_{t-1} - m_t),  i'_t = exp(i~_t - m_t)
    C_t = f'_t C_{t-1} + i'_t k_t v_t^T / sqrt(d)           matrix memory (d x d_v)
    n_t = f'_t n_{t-1} + i'_t k_t / sqrt(d)                 normaliser state
    h_t = C_t^T q_t / (max(|q_t . n_t|, exp(-m_t)) + eps)

The cell is offered as three functions that compute the same numbers:

- :func:`mlstm_recurrent`: the equations above, one step at a time (slow; the readable reference).
- :func:`mlstm_parallel`: the quadratic form ``H = (Q K^T / sqrt(d) * D) V`` with the decay
  matrix ``log D_tj = F_t - F_j + i~_j`` (``F`` the cumulative log forget gate), like attention.
- :func:`mlstm_chunkwise`: the parallel form inside chunks of ``chunk_size`` steps plus the
  states carried between chunks; linear in the sequence length.

All three use the same stabiliser (the recurrent ``m_t`` with ``m_0 = 0``), so they agree to
rounding, eps term included. Gate maths and states run in float32 (float64 for float64 inputs).

The parallel and chunkwise forms factor the decay where that is safe: ``exp(log D_tj - m_t)``
is ``g_t * a_j``, a scale of query t times a scale of key j, so ``Q K^T * D`` is the causal
part of ``(g Q)(a K)^T`` and the S x S decay matrix is never formed (see ``_decay``). Their
``factored`` argument forces (True) or forbids (False) it; by default it is taken wherever the
stabiliser's spread keeps both scales in float32's range and the block is at least as long as
the head size. At the default study's sizes it makes the cell 1.7x faster.

:class:`MLSTMBlock` (registered as ``"mlstm"``) is the pre-up-projection block of the paper's
figure 10, as in NX-AI's official code (``xlstm/blocks/mlstm/layer.py``).
"""

from __future__ import annotations

import functools
import math
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from blocks import native
from blocks.base import Block
from blocks.init import round_up, small_init_, wang_init_
from blocks.ops import causal_depthwise_conv
from blocks.registry import BlockError, register

__all__ = ["MLSTMBlock", "mlstm_chunkwise", "mlstm_gates", "mlstm_native", "mlstm_output",
           "mlstm_parallel", "mlstm_recurrent"]

CELLS = ("auto", "parallel", "chunkwise", "recurrent", "native")

# cell="auto" on the CPU in float32 runs the recurrent form as a C kernel: for heads up to
# LANES_MAX_HEAD the eight-lane kernel (blocks/csrc/mlstm8.c), for larger heads the row kernel
# (blocks/csrc/mlstm.c): at every length for heads up to NATIVE_SMALL_HEAD, from NATIVE_MIN_SEQ
# steps beyond (shorter, the parallel form). Measured, forward + backward, one thread, CPU time.
# Cells alone, eight-lane / row kernel / parallel form, heads of 16 (batch 64 x 4 heads): 0.62 /
# 0.97 / 1.09 ms at 8 steps, 1.0 / 1.8 / 1.9 at 16, 2.7 / 5.0 / 9.1 at 47, 10.2 / 14.2 / 33.4
# at 128; heads of 8 (64 x 2) at 47: 0.74 / 1.8 / 3.6; heads of 64 (16 x 4): 101 / 22 / 17.6 at
# 128 (eight 64 x 64 states leave the cache). Whole block, batch 16, row kernel / auto's torch
# form (median of 15, 2026-12-05, after the row kernel's vector loops and in-place layout):
# heads of 32 (d_model 64): 1.72 / 2.57 ms at 8 steps, 2.42 / 2.83 at 16, 3.90 / 4.50 at 32,
# 7.0 / 9.5 at 64, 11.8 / 13.6 at 96; heads of 64 (d_model 128): 9.35 / 9.16 at 32, 20.7 / 19.3
# at 64, 25.2 / 24.4 at 80, 29.1 / 31.2 at 96, 40.5 / 44.2 at 128.
# With more torch threads the torch forms' products gain more than the row kernel's lanes do
# (d_model 128, 2 threads, 2026-12-05: at 128 steps the row kernel 37.0 ms, the parallel form
# 32.5), so there it runs from NATIVE_MIN_SEQ steps for heads up to NATIVE_SMALL_HEAD and beyond
# 128 steps for larger heads, as measured before.
LANES_MAX_HEAD = 16
CELL_EPS = 1e-6  # the normaliser's eps in every form of the cell (the official default)
NATIVE_MIN_SEQ = 96
NATIVE_SMALL_HEAD = 32

# cell="auto" runs the quadratic parallel form while the sequence fits in this many chunks and
# the chunkwise form beyond. Measured with float32 forward + backward of the whole block at
# d_model 128, 4 heads (head size 64), batch 16, chunk 64. CPU (1 thread): parallel 11% faster
# at 128 steps, even at 192, chunkwise 13% faster at 256 and 1.8x at 384. CUDA (H200): parallel
# 1.2x faster at 256 steps, even at 1024, chunkwise 3.4x faster at 4096.
AUTO_PARALLEL_MAX_CHUNKS = 2
AUTO_PARALLEL_MAX_CHUNKS_CUDA = 16


# --------------------------------------------------------------------------------------------
# helpers shared by the three forms


def _state_dtype(dtype: torch.dtype) -> torch.dtype:
    """Gate maths and states never run below float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _inverse_normaliser(qn: torch.Tensor, m: torch.Tensor, eps: float) -> torch.Tensor:
    """``1 / (max(|qn|, exp(-m)) + eps)`` with no exponential that can overflow.

    For m < 0 numerator and denominator are multiplied by exp(m) <= 1, so a very negative
    stabiliser (e.g. input gates far below zero) gives a tiny output, never inf or NaN.
    """
    scale = torch.exp(m.clamp(max=0.0))
    return scale / (torch.maximum(qn.abs() * scale, torch.exp(-m.clamp(min=0.0))) + eps * scale)


@functools.lru_cache(maxsize=32)
def _causal_bias(size: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """(size, size): 0 on and below the diagonal, -inf above (added before exp)."""
    return torch.full((size, size), float("-inf"), dtype=dtype, device=device).triu_(1)


# Below this magnitude of u and mu (see _decay) the float32 rounding of u and mu costs at most
# 2^-24 * 16 ~ 1e-6 in any exponent: a few float32 ulps of the output, so the hi/lo split is
# skipped.
_LO_PART_NEEDED_ABOVE = 8.0

# The factored form (see _decay) is used while mu rises by at most this much along every row:
# its query scales exp(c - mu_t) then stay below e^40 ~ 2e17, far from float32's overflow, and
# a key scale exp(u_j - c) that underflows to zero (exponent below -103) stands for a weight
# below e^-63 of the row's largest, which the explicit matrix would round away as well.
FACTORED_MAX_SPREAD = 40.0


class _Decay(NamedTuple):
    """The stabilised decay of the parallel form over the last axis, in one of two forms.

    ``m`` (..., S) is the stabiliser and ``w_start`` (..., S) = exp(F_t + m_start - m_t) the
    weight of an incoming state. The decay weights ``exp(log D_tj - m_t)`` (j <= t) are either
    the product ``g_t * a_j`` of a query scale ``g`` and a key scale ``a`` (each (..., S);
    ``matrix`` is None), or, where that product could leave float32's range, the (..., S, S)
    ``matrix`` itself (``a`` and ``g`` None).
    """

    m: torch.Tensor
    w_start: torch.Tensor
    g: torch.Tensor | None = None
    a: torch.Tensor | None = None
    matrix: torch.Tensor | None = None

    def read(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``((q k^T * D) v, (q k^T * D) 1)``: the decayed causal scores applied to the values
        (..., S, DV) and their row sums (..., S), q already scaled by 1/sqrt(d).

        Factored, ``q k^T * D = tril((g q)(a k)^T)`` (:class:`_CausalReadout`): the mask and the
        row sum are the only S x S passes besides the products, and the backward has one (the
        mask, in place), against six and six for an explicit matrix, which is most of the cell's
        cost at MAD's sizes (the row sums from ``(g q) . cumsum(a k)`` would trade one S x S pass
        for several S x DQK ones: slower).
        """
        if self.matrix is None:
            qs, ks = q * self.g.unsqueeze(-1), k * self.a.unsqueeze(-1)
            return _CausalReadout.apply(qs, ks, v)
        scores = torch.matmul(q, k.transpose(-2, -1)) * self.matrix
        return scores @ v, scores.sum(dim=-1)


class _CausalReadout(torch.autograd.Function):
    """``P = tril(q k^T)``; returns ``(P v, P 1)``, with a hand-written backward.

    Autograd through ``matmul(...).tril_()``, ``@ v`` and ``.sum(-1)`` spends two full S x S
    passes in the backward that this one does not: the row sums' gradient is added inside the
    product that forms dP (``baddbmm``), and dP is masked in place instead of copied by tril.
    """

    @staticmethod
    def forward(ctx, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor):
        scores = torch.matmul(q, k.transpose(-2, -1)).tril_()
        ctx.save_for_backward(q, k, v, scores)
        return scores @ v, scores.sum(dim=-1)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, d_out: torch.Tensor | None, d_sums: torch.Tensor | None):
        q, k, v, scores = ctx.saved_tensors
        lead, (S, DV) = q.shape[:-2], v.shape[-2:]
        if d_out is None:
            d_out = v.new_zeros(*lead, S, DV)
        flat = (-1, S)  # bmm over every leading axis at once
        d_scores = torch.baddbmm(
            (d_sums if d_sums is not None else v.new_zeros(*lead, S)).reshape(-1, S, 1),
            d_out.reshape(*flat, DV),
            v.reshape(*flat, DV).transpose(1, 2),
        ).tril_()
        q3, k3 = q.reshape(*flat, q.shape[-1]), k.reshape(*flat, k.shape[-1])
        d_q = torch.bmm(d_scores, k3).view(q.shape)
        d_k = torch.bmm(d_scores.transpose(1, 2), q3).view(k.shape)
        d_v = torch.bmm(scores.reshape(*flat, S).transpose(1, 2), d_out.reshape(*flat, DV))
        return d_q, d_k, d_v.view(v.shape)


def _factored_choice(factored: bool | None, size: int, dqk: int) -> bool | None:
    """The factored form saves S x S passes but adds S x DQK ones (the scaled q and k and their
    gradients): measured on CPU it pays from S >= DQK on (None: if the spread allows)."""
    if factored is None and size < dqk:
        return False
    return factored


def _decay(
    log_f: torch.Tensor,
    i_pre: torch.Tensor,
    m_start: torch.Tensor | None = None,
    factored: bool | None = None,
) -> _Decay:
    """Decay of the parallel form over the last axis, already divided by exp(m_t).

    With ``F_t = sum_{s<=t} log f_s`` and a state entering with stabiliser ``m_start`` (0 at
    the start of a sequence):

        log D_tj = F_t - F_j + i~_j  (j <= t),   m_t = max(F_t + m_start, max_j log D_tj)

    Writing ``u_j = i~_j - F_j`` and ``mu_t = max(m_start, max_{j<=t} u_j)`` gives
    ``m_t = F_t + mu_t`` and ``log D_tj - m_t = u_j - mu_t``: no S x S max is needed. u and mu
    come from a float64 cumulative sum (F_t - F_j from float32 sums loses precision on long
    sequences).

    Factored form: with ``c`` the row's last (largest) mu, ``exp(u_j - mu_t) =
    exp(u_j - c) * exp(c - mu_t)``, both factors computed in float64 and rounded once. Used when
    ``factored`` is None and mu spreads by at most FACTORED_MAX_SPREAD along every row (True
    forces it, False forbids it). Otherwise the S x S matrix is formed, from hi and lo float32
    parts where u and mu are large (the lo part is a constant for autograd; its gradient is
    exactly zero).
    """
    dtype, size = log_f.dtype, log_f.shape[-1]
    cum_f = torch.cumsum(log_f.double(), dim=-1)
    u = i_pre.double() - cum_f
    mu = torch.cummax(u, dim=-1).values
    m_start = u.new_zeros(()) if m_start is None else m_start.double().unsqueeze(-1)
    mu = torch.maximum(mu, m_start)
    m = (cum_f + mu).to(dtype)
    w_start = torch.exp(m_start - mu).to(dtype)
    c = mu[..., -1:].detach()  # any constant gives the same function; this one bounds a by 1
    if factored is None:
        factored = bool((c[..., 0] - mu[..., 0]).max() <= FACTORED_MAX_SPREAD)
    if factored:
        g = torch.exp(c - mu).to(dtype)
        a = torch.exp(u - c).to(dtype)
        return _Decay(m, w_start, g=g, a=a)

    u_hi, mu_hi = u.to(dtype), mu.to(dtype)
    # an add of -mu (not a subtract) spares autograd a negation of the S x S gradient
    log_d = u_hi.unsqueeze(-2) + (-mu_hi).unsqueeze(-1)
    with torch.no_grad():
        bias = _causal_bias(size, dtype, log_f.device)
        if dtype != torch.float64 and max(u.abs().max(), mu.abs().max()) > _LO_PART_NEEDED_ABOVE:
            u_lo, mu_lo = (u - u_hi.double()).to(dtype), (mu - mu_hi.double()).to(dtype)
            bias = (u_lo.unsqueeze(-2) - mu_lo.unsqueeze(-1)).add_(bias)
    log_d.add_(bias)  # the causal mask (and lo part): a constant, so no extra backward pass
    return _Decay(m, w_start, matrix=torch.exp(log_d))


# --------------------------------------------------------------------------------------------
# the three forms of the cell


def mlstm_recurrent(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    i_preact: torch.Tensor,
    f_preact: torch.Tensor,
    eps: float = 1e-6,
) -> torch.Tensor:
    """mLSTM cell, one time step after another (the reference; O(S) Python steps).

    Shapes: q, k (B, NH, S, DQK); v (B, NH, S, DV); i_preact, f_preact (B, NH, S).
    Returns h (B, NH, S, DV) in q's dtype.
    """
    out_dtype, dtype = q.dtype, _state_dtype(q.dtype)
    q, k, v = q.to(dtype), k.to(dtype), v.to(dtype)
    i_pre, log_f = i_preact.to(dtype), F.logsigmoid(f_preact.to(dtype))
    B, NH, S, DQK = q.shape
    k = k / math.sqrt(DQK)

    C = q.new_zeros(B, NH, DQK, v.shape[-1])
    n = q.new_zeros(B, NH, DQK)
    m = q.new_zeros(B, NH)
    hs = []
    for t in range(S):
        m_new = torch.maximum(log_f[..., t] + m, i_pre[..., t])
        f_gate = torch.exp(log_f[..., t] + m - m_new)
        i_gate = torch.exp(i_pre[..., t] - m_new)
        k_t, v_t, q_t = k[..., t, :], v[..., t, :], q[..., t, :]
        kv_t = k_t[..., :, None] * v_t[..., None, :]
        C = f_gate[..., None, None] * C + i_gate[..., None, None] * kv_t
        n = f_gate[..., None] * n + i_gate[..., None] * k_t
        m = m_new
        h_num = torch.einsum("bhd,bhde->bhe", q_t, C)
        qn = (q_t * n).sum(-1)
        hs.append(h_num * _inverse_normaliser(qn, m, eps)[..., None])
    return torch.stack(hs, dim=-2).to(out_dtype)


def mlstm_parallel(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    i_preact: torch.Tensor,
    f_preact: torch.Tensor,
    eps: float = 1e-6,
    factored: bool | None = None,
) -> torch.Tensor:
    """mLSTM cell in the quadratic parallel form: O(S^2) memory and time, no loop.

    ``H = (C~ V) / (max(|C~ 1|, exp(-m)) + eps)`` with ``C~ = (Q K^T / sqrt(d)) * exp(log D - m)``.
    Shapes as :func:`mlstm_recurrent`.
    """
    out_dtype, dtype = q.dtype, _state_dtype(q.dtype)
    q, k, v = q.to(dtype), k.to(dtype), v.to(dtype)
    log_f = F.logsigmoid(f_preact.to(dtype))
    factored = _factored_choice(factored, q.shape[-2], q.shape[-1])
    decay = _decay(log_f, i_preact.to(dtype), factored=factored)
    h_num, qn = decay.read(q * q.shape[-1] ** -0.5, k, v)  # qn: q_t . n_t, stabilised scale
    return (h_num * _inverse_normaliser(qn, decay.m, eps)[..., None]).to(out_dtype)


def mlstm_chunkwise(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    i_preact: torch.Tensor,
    f_preact: torch.Tensor,
    eps: float = 1e-6,
    chunk_size: int = 64,
    factored: bool | None = None,
) -> torch.Tensor:
    """mLSTM cell, chunkwise: parallel inside chunks of ``chunk_size``, states between them.

    Cost O(S * chunk_size) plus O((S / chunk_size)^2 * DQK * DV). The state entering every chunk
    is itself computed in parallel: it is the parallel form one level up, over chunks, whose
    "inputs" are the chunks' summed k v^T and "forget gates" the chunks' total log forget gate.
    A last chunk shorter than ``chunk_size`` is padded at the end (padding never reaches an
    earlier position). Shapes as :func:`mlstm_recurrent`.
    """
    B, NH, S, DQK = q.shape
    L = max(1, min(int(chunk_size), S))
    NC = -(-S // L)
    if NC == 1:
        return mlstm_parallel(q, k, v, i_preact, f_preact, eps, factored)
    out_dtype, dtype = q.dtype, _state_dtype(q.dtype)
    DV = v.shape[-1]
    pad = NC * L - S

    q = q.to(dtype) * DQK**-0.5
    k, v = k.to(dtype), v.to(dtype)
    i_pre, log_f = i_preact.to(dtype), F.logsigmoid(f_preact.to(dtype))
    if pad:
        q, k, v = (F.pad(t, (0, 0, 0, pad)) for t in (q, k, v))
        i_pre, log_f = F.pad(i_pre, (0, pad)), F.pad(log_f, (0, pad))
    q = q.view(B, NH, NC, L, DQK)
    k = k.view(B, NH, NC, L, DQK)
    v = v.view(B, NH, NC, L, DV)
    i_pre, log_f = i_pre.view(B, NH, NC, L), log_f.view(B, NH, NC, L)

    # What each chunk adds to the state, stabilised by its own max m_loc: C gets
    # sum_j exp(a_j - m_loc) k_j v_j^T and n gets sum_j exp(a_j - m_loc) k_j, where
    # a_j = g - b_j + i~_j is input j's log weight at the chunk's end (b = cumsum log f, g = b_L).
    cum_f = torch.cumsum(log_f.double(), dim=-1)
    g = cum_f[..., -1]  # (B, NH, NC) total log forget gate of each chunk
    a = g.unsqueeze(-1) - cum_f + i_pre.double()
    m_loc = a.max(dim=-1).values
    k_weighted = k * torch.exp(a - m_loc.unsqueeze(-1)).to(dtype).unsqueeze(-1)
    kv = k_weighted.transpose(-2, -1) @ v  # (B, NH, NC, DQK, DV)
    kn = k_weighted.sum(dim=-2)  # (B, NH, NC, DQK)

    # The state entering chunk c (C_prev, n_prev, m_prev) is the parallel form over chunks.
    # Sources: 0 the initial state (zero, with m = 0), s >= 1 chunk s - 1 (its log weight m_loc),
    # decayed by the forget gates of chunks s .. c - 1.
    zero = g.new_zeros(B, NH, 1)
    x = torch.cat([zero, g[..., :-1]], dim=-1)
    src_m = torch.cat([zero, m_loc[..., :-1]], dim=-1)
    cum_x = torch.cumsum(x, dim=-1)
    u = src_m - cum_x
    mu = torch.cummax(u, dim=-1).values
    m_prev = cum_x + mu  # (B, NH, NC), float64
    log_w = u.unsqueeze(-2) - mu.unsqueeze(-1) + _causal_bias(NC, u.dtype, u.device)
    w_src = torch.exp(log_w[..., 1:]).to(dtype)  # (B, NH, NC, NC - 1); the zero state drops out
    C_prev = (w_src @ kv[:, :, :-1].flatten(-2)).view(B, NH, NC, DQK, DV)
    n_prev = w_src @ kn[:, :, :-1]  # (B, NH, NC, DQK)

    # Inside each chunk: the parallel form, plus the entering state read with weight w_start.
    decay = _decay(log_f, i_pre, m_prev, factored=_factored_choice(factored, L, DQK))
    h_num, qn = decay.read(q, k, v)  # (B, NH, NC, L, DV), (B, NH, NC, L)
    q_start = q * decay.w_start.unsqueeze(-1)
    h_num = h_num + q_start @ C_prev
    qn = qn + (q_start * n_prev.unsqueeze(-2)).sum(dim=-1)
    h = h_num * _inverse_normaliser(qn, decay.m, eps).unsqueeze(-1)
    return h.reshape(B, NH, NC * L, DV)[:, :, :S].to(out_dtype)


def _native_cell_library():
    I64, F32, PTR = native.I64, native.F32, native.PTR
    head = [I64] * 6 + [PTR, PTR, F32]
    return native.library("mlstm", {"mad_mlstm_fwd": head + [PTR] * 10,
                                    "mad_mlstm_bwd": head + [PTR] * 15})


def _lane_strides(t: torch.Tensor) -> torch.Tensor:
    """(batch, head, step) element strides of a (B, NH, S, D) tensor, for ``mlstm.c``."""
    return torch.tensor(t.stride()[:3], dtype=torch.int64)


def _dense(t: torch.Tensor) -> torch.Tensor:
    """``t`` if its last axis is contiguous and ``empty_like`` keeps its strides, else a
    contiguous copy, so that outputs made with ``empty_like`` share its layout."""
    if t.stride(-1) == 1 and torch.empty_like(t).stride() == t.stride():
        return t
    return t.contiguous()


def _like_layout(t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """``t`` with ``like``'s strides (a copy only where they differ)."""
    if t.stride() == like.stride():
        return t
    return torch.empty_like(like).copy_(t)


def _row_kernel_pays(head_dim: int, seq_len: int) -> bool:
    """Whether ``cell=auto`` runs the row kernel for heads of ``head_dim`` over ``seq_len`` steps
    on the CPU in float32 (the measurements above the constants)."""
    if torch.get_num_threads() == 1:  # a pool worker's setting
        return head_dim <= NATIVE_SMALL_HEAD or seq_len >= NATIVE_MIN_SEQ
    return seq_len >= NATIVE_MIN_SEQ and (head_dim <= NATIVE_SMALL_HEAD or seq_len > 128)


def _rows_forward(q, k, v, i_pre, f_pre, eps):
    """``blocks/csrc/mlstm.c``'s forward: h in v's layout, and what the backward needs."""
    lib = _native_cell_library()
    B, NH, S, DQK = q.shape
    DV = v.shape[-1]
    P = B * NH
    q, v = _dense(q), _dense(v)
    k = _like_layout(k, q)
    i_pre, f_pre = i_pre.contiguous(), f_pre.contiguous()
    h, hnum = torch.empty_like(v), v.new_empty(B, NH, S, DV)
    m, qn = torch.empty_like(i_pre), torch.empty_like(i_pre)
    ws = q.new_empty(native.slots(P), 2 * (DQK * DV + DQK))
    sq, sv = _lane_strides(q), _lane_strides(v)
    p = native.pointer
    native.parallel(P, lambda slot, p0, p1: lib.mad_mlstm_fwd(
        p0, p1, S, DQK, DV, NH, p(sq), p(sv), eps, p(q), p(k), p(v), p(i_pre), p(f_pre),
        p(h), p(hnum), p(m), p(qn), p(ws[slot])))
    return h, (q, k, v, i_pre, f_pre, hnum, m, qn)


def _rows_backward(saved, eps, dh):
    """``blocks/csrc/mlstm.c``'s backward: dq, dk, dv in the layouts of q, k (as q) and v; di, df
    contiguous (B, NH, S)."""
    lib = _native_cell_library()
    q, k, v, i_pre, f_pre, hnum, m, qn = saved
    B, NH, S, DQK = q.shape
    DV = v.shape[-1]
    P = B * NH
    dh = _like_layout(dh, v)
    dq, dk, dv = torch.empty_like(q), torch.empty_like(q), torch.empty_like(v)
    di, df = torch.empty_like(i_pre), torch.empty_like(f_pre)
    QV = DQK * DV
    ws = q.new_empty(native.slots(P), (S + 2) * QV + (S + 1) * DQK + 5 * DQK + 2 * DV)
    sq, sv = _lane_strides(q), _lane_strides(v)
    p = native.pointer
    native.parallel(P, lambda slot, p0, p1: lib.mad_mlstm_bwd(
        p0, p1, S, DQK, DV, NH, p(sq), p(sv), eps, p(q), p(k), p(v), p(i_pre), p(f_pre),
        p(hnum), p(m), p(qn), p(dh), p(dq), p(dk), p(dv), p(di), p(df), p(ws[slot])))
    return dq, dk, dv, di, df


class _NativeMLSTM(torch.autograd.Function):
    """The recurrent form by the C kernel ``blocks/csrc/mlstm.c``, one lane (batch x head) at a
    time; the backward recomputes a lane's states. Saves the inputs, C^T q, q . n and the
    stabiliser per step. q, k, v are read where they lie (any strides with the last axis
    contiguous), h and dv are written in v's layout, dq and dk in q's: the block's (B, S, NH, D)
    memory passes through without copies."""

    @staticmethod
    def forward(ctx, q, k, v, i_pre, f_pre, eps):
        h, saved = _rows_forward(q, k, v, i_pre, f_pre, eps)
        ctx.save_for_backward(*saved)
        ctx.eps = eps
        return h

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dh):
        return (*_rows_backward(ctx.saved_tensors, ctx.eps, dh), None)


def _native_lanes_library():
    I64, F32, PTR = native.I64, native.F32, native.PTR
    head = [I64] * 8 + [F32] + [PTR]
    return native.library("mlstm8", {"mad_mlstm8_fwd": head + [PTR] * 9,
                                     "mad_mlstm8_bwd": head + [PTR] * 14})


def _strides(*tensors: torch.Tensor) -> list[int]:
    """(b, h, t) strides of (B, NH, S, D) or (B, NH, S) tensors, for the kernel's gathers."""
    return [st for t in tensors for st in t.stride()[:3]]


def _lanes_segment(dqk: int, dv: int, seq: int) -> int:
    """Steps per checkpoint segment of the eight-lane kernel: its backward keeps T + 1 states of
    eight lanes in cache (about 128 KB at heads of 16)."""
    return max(1, min(seq, 4096 // (dqk * dv)))


def _lanes_forward(q, k, v, i_pre, f_pre, eps):
    """``blocks/csrc/mlstm8.c``'s forward: h (a (B, NH, S, DV) view of (B, S, NH, DV) memory)
    and what its backward needs (saved, ckpt, T)."""
    lib = _native_lanes_library()
    B, NH, S, DQK = q.shape
    DV = v.shape[-1]
    P = B * NH
    groups = -(-P // 8)
    T = _lanes_segment(DQK, DV, S)
    h = q.new_empty(B, S, NH, DV).transpose(1, 2)  # (B, S, inner) memory: no copy after
    saved = q.new_empty(groups, S * (DV + 2) * 8)
    ckpt = q.new_empty(groups, -(-S // T) * (DQK * DV + DQK) * 8)
    st = native.int64s(_strides(q, k, v, i_pre, f_pre, h))
    ws = q.new_empty(native.slots(groups), S * (2 * DQK + 2 * DV + 2) * 8
                     + (DQK * DV + DQK) * 8)
    p = native.pointer
    native.parallel(groups, lambda slot, g0, g1: lib.mad_mlstm8_fwd(
        g0, g1, P, NH, S, DQK, DV, T, eps, st, p(q), p(k), p(v), p(i_pre), p(f_pre), p(h),
        p(saved), p(ckpt), p(ws[slot])))
    return h, saved, ckpt, T


def _lanes_backward(q, k, v, i_pre, f_pre, saved, ckpt, T, eps, dh, di=None, df=None):
    """``blocks/csrc/mlstm8.c``'s backward: dq, dk, dv ((B, NH, S, D) views of (B, S, NH, D)
    memory) and di, df, written into the given (B, NH, S) views where there are some."""
    lib = _native_lanes_library()
    B, NH, S, DQK = q.shape
    DV = v.shape[-1]
    P = B * NH
    groups = -(-P // 8)
    dh = _last_axis_contiguous(dh)
    dq = q.new_empty(B, S, NH, DQK).transpose(1, 2)
    dk = q.new_empty(B, S, NH, DQK).transpose(1, 2)
    dv = q.new_empty(B, S, NH, DV).transpose(1, 2)
    di = i_pre.new_empty(B, NH, S) if di is None else di
    df = f_pre.new_empty(B, NH, S) if df is None else df
    st = native.int64s(_strides(q, k, v, i_pre, f_pre, dh, dq, dk, dv, di, df))
    QV = DQK * DV
    ws = q.new_empty(native.slots(groups), S * (4 * DQK + 3 * DV + 4) * 8
                     + (T + 2) * (QV + DQK) * 8)
    p = native.pointer
    native.parallel(groups, lambda slot, g0, g1: lib.mad_mlstm8_bwd(
        g0, g1, P, NH, S, DQK, DV, T, eps, st, p(q), p(k), p(v), p(i_pre), p(f_pre),
        p(dh), p(saved), p(ckpt), p(dq), p(dk), p(dv), p(di), p(df), p(ws[slot])))
    return dq, dk, dv, di, df


def _last_axis_contiguous(t: torch.Tensor) -> torch.Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()


class _NativeMLSTM8(torch.autograd.Function):
    """The recurrent form by the C kernel ``blocks/csrc/mlstm8.c``: eight lanes per vector, inputs
    read in place through their strides; saves C^T q, m and q . n per step and the states at
    every segment's start."""

    @staticmethod
    def forward(ctx, q, k, v, i_pre, f_pre, eps):
        q, k, v = (_last_axis_contiguous(t) for t in (q, k, v))
        h, saved, ckpt, T = _lanes_forward(q, k, v, i_pre, f_pre, eps)
        ctx.save_for_backward(q, k, v, i_pre, f_pre, saved, ckpt)
        ctx.eps, ctx.T = eps, T
        return h

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dh):
        q, k, v, i_pre, f_pre, saved, ckpt = ctx.saved_tensors
        return (*_lanes_backward(q, k, v, i_pre, f_pre, saved, ckpt, ctx.T, ctx.eps, dh), None)


def _gates_backward(q, k, v, weight, d_gates, dq, dk, dv):
    """The gates' part of the backward of a fused node: their part of dq, dk, dv added in place
    (dq etc. are (B, NH, S, DH) views of (B, S, I) memory), the weight's and bias's gradients."""
    B, S, I = q.shape
    dg = d_gates.view(-1, d_gates.shape[-1])
    for dx, w in zip((dq, dk, dv), _gate_parts(weight, I)):
        dx.transpose(1, 2).view(-1, I).addmm_(dg, w)
    d_weight = torch.cat([dg.t() @ x.view(-1, I) for x in (q, k, v)], dim=1)
    dx_of = [t.transpose(1, 2).reshape(B, S, I) for t in (dq, dk, dv)]
    return (*dx_of, d_weight, dg.sum(0))


class _NativeGatedMLSTM(torch.autograd.Function):
    """:func:`mlstm_gates` and a native cell in one autograd node, for the block:
    ``(q, k, v (B, S, I), weight (2 NH, 3I), bias) -> h`` (a (B, NH, S, DH) view of (B, S, I)
    memory); ``kernel`` "lanes" (``mlstm8.c``) or "rows" (``mlstm.c``). The cell's backward
    gives the gates' gradient as a (B, S, 2 NH) tensor (the eight-lane kernel writes it there
    directly), and the gates' products then add their part of dq, dk and dv in place
    (``addmm_``): no separate gradients for autograd to sum."""

    @staticmethod
    def forward(ctx, q, k, v, weight, bias, num_heads, eps, kernel):
        q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
        B, S, I = q.shape
        NH = num_heads
        gates = mlstm_gates(q, k, v, weight, bias)
        i_pre, f_pre = gates[..., :NH].transpose(1, 2), gates[..., NH:].transpose(1, 2)
        qh, kh, vh = (t.view(B, S, NH, I // NH).transpose(1, 2) for t in (q, k, v))
        if kernel == "lanes":
            h, saved, ckpt, T = _lanes_forward(qh, kh, vh, i_pre, f_pre, eps)
            ctx.save_for_backward(q, k, v, weight, gates, saved, ckpt)
            ctx.T = T
        else:
            h, saved = _rows_forward(qh, kh, vh, i_pre, f_pre, eps)
            ctx.save_for_backward(q, k, v, weight, gates, *saved[3:])  # i~, f~, hnum, m, qn
        ctx.NH, ctx.eps, ctx.kernel = NH, eps, kernel
        return h

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dh):
        q, k, v, weight, gates, *rest = ctx.saved_tensors
        B, S, I = q.shape
        NH = ctx.NH
        i_pre, f_pre = gates[..., :NH].transpose(1, 2), gates[..., NH:].transpose(1, 2)
        qh, kh, vh = (t.view(B, S, NH, I // NH).transpose(1, 2) for t in (q, k, v))
        d_gates = gates.new_empty(B, S, 2 * NH)
        if ctx.kernel == "lanes":
            saved, ckpt = rest
            dq, dk, dv, _, _ = _lanes_backward(
                qh, kh, vh, i_pre, f_pre, saved, ckpt, ctx.T, ctx.eps, dh,
                di=d_gates[..., :NH].transpose(1, 2), df=d_gates[..., NH:].transpose(1, 2))
        else:
            dq, dk, dv, di, df = _rows_backward((qh, kh, vh, *rest), ctx.eps, dh)
            d_gates[..., :NH] = di.transpose(1, 2)
            d_gates[..., NH:] = df.transpose(1, 2)
        return (*_gates_backward(q, k, v, weight, d_gates, dq, dk, dv), None, None, None)


def mlstm_native(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    i_preact: torch.Tensor,
    f_preact: torch.Tensor,
    eps: float = 1e-6,
    kernel: str = "auto",
) -> torch.Tensor:
    """mLSTM cell, recurrent form, by a C kernel (float32 on the CPU): the same function as
    :func:`mlstm_recurrent`, gradients included. Shapes as :func:`mlstm_recurrent`; any strides
    with the last axis contiguous.

    ``kernel``: "lanes" (``blocks/csrc/mlstm8.c``: eight lanes per vector, heads up to 64),
    "rows" (``blocks/csrc/mlstm.c``: a lane at a time, vectors along the state's rows), or
    "auto": lanes for heads up to ``LANES_MAX_HEAD``, rows beyond (measured; see the constants).
    """
    tensors = (q, k, v, i_preact, f_preact)
    if not all(t.device.type == "cpu" and t.dtype == torch.float32 for t in tensors):
        raise RuntimeError("the native mLSTM cell needs float32 CPU tensors")
    if kernel not in ("auto", "lanes", "rows"):
        raise ValueError(f"kernel must be 'auto', 'lanes' or 'rows', got {kernel!r}")
    DQK, DV = q.shape[-1], v.shape[-1]
    if kernel == "auto":
        kernel = "lanes" if max(DQK, DV) <= LANES_MAX_HEAD else "rows"
    if kernel == "lanes" and max(DQK, DV) > 64:
        raise RuntimeError(f"the eight-lane mLSTM kernel takes heads up to 64, got {DQK} x {DV}")
    name, loader = (("mlstm8", _native_lanes_library) if kernel == "lanes"
                    else ("mlstm", _native_cell_library))
    if loader() is None:
        raise RuntimeError(f"the native mLSTM cell is unavailable: {native.status.get(name)}")
    fn = _NativeMLSTM8 if kernel == "lanes" else _NativeMLSTM
    return fn.apply(q, k, v, i_preact, f_preact, float(eps))


_CELL_FNS = {
    "native": mlstm_native,
    "parallel": mlstm_parallel,
    "chunkwise": mlstm_chunkwise,
    "recurrent": mlstm_recurrent,
}


# --------------------------------------------------------------------------------------------
# the block


def _native_output_library():
    I64, F32, PTR = native.I64, native.F32, native.PTR
    return native.library("mlstm_out", {"mad_mlstm_out_fwd": [I64] * 4 + [F32] + [PTR] * 7,
                                        "mad_mlstm_out_bwd": [I64] * 4 + [PTR] * 12})


class _NativeOutput(torch.autograd.Function):
    """:func:`mlstm_output` by the C kernel ``blocks/csrc/mlstm_out.c``; saves the inputs and each
    head's mean and inverse deviation."""

    @staticmethod
    def forward(ctx, h, x, z, weight, skip, head_dim, eps):
        lib = _native_output_library()
        h, x, z = h.contiguous(), x.contiguous(), z.contiguous()
        weight, skip = weight.contiguous(), skip.contiguous()
        *lead, I = h.shape
        N = h.numel() // I
        y = torch.empty_like(h)
        stats = h.new_empty(N, I // head_dim, 2)
        p = native.pointer
        native.parallel(N, lambda slot, n0, n1: lib.mad_mlstm_out_fwd(
            n0, n1, I, head_dim, eps, p(h), p(x), p(z), p(weight), p(skip), p(y), p(stats)))
        ctx.save_for_backward(h, x, z, weight, skip, stats)
        ctx.head_dim = head_dim
        return y

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dy):
        lib = _native_output_library()
        h, x, z, weight, skip, stats = ctx.saved_tensors
        dy = dy.contiguous()
        I = h.shape[-1]
        N = h.numel() // I
        dh, dx, dz = torch.empty_like(h), torch.empty_like(x), torch.empty_like(z)
        slots = native.slots(N)
        dw, ds = h.new_zeros(slots, I), h.new_zeros(slots, I)
        p = native.pointer
        native.parallel(N, lambda slot, n0, n1: lib.mad_mlstm_out_bwd(
            n0, n1, I, ctx.head_dim, p(h), p(x), p(z), p(weight), p(skip), p(stats), p(dy),
            p(dh), p(dx), p(dz), p(dw[slot]), p(ds[slot])))
        return dh, dx, dz, dw.sum(0), ds.sum(0), None, None


def mlstm_output(
    h: torch.Tensor,
    x: torch.Tensor,
    z: torch.Tensor,
    weight: torch.Tensor,
    skip: torch.Tensor,
    head_dim: int,
    eps: float = 1e-5,
    impl: str = "auto",
) -> torch.Tensor:
    """The mLSTM block's output gate: ``(GroupNorm_heads(h) * weight + skip * x) * SiLU(z)``.

    h, x, z (..., I) with each token's heads side by side (``head_dim`` channels each); the group
    norm is a layer norm over each head's channels (no affine), then one weight per channel.
    ``impl``: ``"native"`` the C kernel ``blocks/csrc/mlstm_out.c`` (float32 on the CPU),
    ``"torch"`` torch's operators, ``"auto"`` the C kernel where it is loaded and applies.
    """
    if native.choose(impl, "mlstm_out", (h, x, z, weight, skip), _native_output_library):
        return _NativeOutput.apply(h, x, z, weight, skip, int(head_dim), float(eps))
    *lead, I = h.shape
    normed = F.layer_norm(h.reshape(*lead, I // head_dim, head_dim), (head_dim,), eps=eps)
    return torch.addcmul(normed.reshape(h.shape) * weight, skip, x) * F.silu(z)


def _gate_parts(weight: torch.Tensor, width: int) -> list[torch.Tensor]:
    """The (J, I) blocks of the gates' (J, 3I) weight that multiply q, k and v."""
    return [weight[:, i * width:(i + 1) * width] for i in range(3)]


def mlstm_gates(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor,
) -> torch.Tensor:
    """Gate pre-activations from each token's q, k, v: ``Linear(3I -> J)([q, k, v])``.

    q, k, v (..., I); weight (J, 3I); bias (J); returns (..., J). Three accumulating products,
    one per part, instead of one over the concatenation: no copy of q, k, v, and the backward's
    products read them in place (measured faster on the CPU than a C kernel for it, which an
    earlier version had: with eight gates per token a kernel spends its time on horizontal
    sums).
    """
    *lead, I = q.shape
    rows = [t.reshape(-1, I) for t in (q, k, v)]
    wq, wk, wv = _gate_parts(weight, I)
    g = torch.addmm(bias, rows[0], wq.t())
    g = torch.addmm(g, rows[1], wk.t())
    g = torch.addmm(g, rows[2], wv.t())
    return g.view(*lead, weight.shape[0])


def _channels_last(x: torch.Tensor) -> torch.Tensor:
    """(B, S, C) -> (B, C, 1, S): the same memory seen as a channels-last image, no copy.

    Convolutions on this view run in PyTorch's channels-last kernels and return (B, C', 1, S)
    channels-last, which :func:`_from_channels_last` turns back into (B, S, C') for free.
    """
    return x.transpose(1, 2).unsqueeze(2)


def _from_channels_last(y: torch.Tensor) -> torch.Tensor:
    return y.squeeze(2).transpose(1, 2)


def _native_headwise_library():
    I64, PTR = native.I64, native.PTR
    return native.library("headwise", {"mad_headwise_fwd": [I64] * 4 + [PTR] * 4,
                                       "mad_headwise_bwd": [I64] * 5 + [PTR] * 6})


def _headwise_forward(x: torch.Tensor, W: torch.Tensor) -> torch.Tensor:
    """``blocks/csrc/headwise.c``'s forward on contiguous x and W."""
    lib = _native_headwise_library()
    nb, bs = W.shape[0], W.shape[1]
    rows = x.numel() // (nb * bs)
    y = torch.empty_like(x)
    ws = x.new_empty(native.slots(rows), 4 * nb * bs)
    p = native.pointer
    native.parallel(rows, lambda slot, t0, t1: lib.mad_headwise_fwd(
        t0, t1, nb, bs, p(x), p(W), p(y), p(ws[slot])))
    return y


def _headwise_backward(x, W, dy, dx=None):
    """``blocks/csrc/headwise.c``'s backward: (dx, dW); adds to ``dx`` where one is given."""
    lib = _native_headwise_library()
    nb, bs = W.shape[0], W.shape[1]
    dy = dy.contiguous()
    rows = x.numel() // (nb * bs)
    accumulate = dx is not None
    dx = torch.empty_like(x) if dx is None else dx
    slots = native.slots(rows)
    dW = W.new_zeros(slots, nb, bs, bs)
    ws = x.new_empty(slots, 8 * nb * bs)
    p = native.pointer
    native.parallel(rows, lambda slot, t0, t1: lib.mad_headwise_bwd(
        t0, t1, nb, bs, int(accumulate), p(x), p(W), p(dy), p(dx), p(dW[slot]), p(ws[slot])))
    return dx, (dW[0] if slots == 1 else dW.sum(0))


class _NativeHeadwise(torch.autograd.Function):
    """``x (..., nb * bs) -> y``, ``y[..., g bs + o] = sum_i W[g, o, i] x[..., g bs + i]``, by the
    C kernel ``blocks/csrc/headwise.c`` (float32, CPU)."""

    @staticmethod
    def forward(ctx, x, weight):
        x, W = x.contiguous(), weight.contiguous()
        ctx.save_for_backward(x, W)
        return _headwise_forward(x, W)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dy):
        x, W = ctx.saved_tensors
        return _headwise_backward(x, W, dy)


class _NativeHeadwiseQKV(torch.autograd.Function):
    """The mLSTM's three headwise maps in one autograd node: ``q, k = Wq x_c, Wk x_c`` and
    ``v = Wv x_m``; the backward adds k's part of dx_c to q's in the same pass (no separate sum)."""

    @staticmethod
    def forward(ctx, x_c, x_m, wq, wk, wv):
        x_c, x_m = x_c.contiguous(), x_m.contiguous()
        wq, wk, wv = wq.contiguous(), wk.contiguous(), wv.contiguous()
        ctx.save_for_backward(x_c, x_m, wq, wk, wv)
        return _headwise_forward(x_c, wq), _headwise_forward(x_c, wk), _headwise_forward(x_m, wv)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dq, dk, dv):
        x_c, x_m, wq, wk, wv = ctx.saved_tensors
        dx_c, dx_m, dws = None, None, []
        for x, w, dy, of_c in ((x_c, wq, dq, True), (x_c, wk, dk, True), (x_m, wv, dv, False)):
            if dy is None:
                dws.append(torch.zeros_like(w))
                continue
            if of_c:
                dx_c, dw = _headwise_backward(x, w, dy, dx_c)
            else:
                dx_m, dw = _headwise_backward(x, w, dy)
            dws.append(dw)
        return dx_c, dx_m, *dws


def headwise_qkv(x_c: torch.Tensor, x_m: torch.Tensor, q_proj: HeadwiseLinear,
                 k_proj: HeadwiseLinear, v_proj: HeadwiseLinear, impl: str = "auto"):
    """``q_proj(x_c), k_proj(x_c), v_proj(x_m)``; as one C-kernel node where the headwise kernel
    applies (``impl`` as :meth:`HeadwiseLinear.forward`)."""
    weights = (q_proj.weight, k_proj.weight, v_proj.weight)
    if native.choose(impl, "headwise", (x_c, x_m, *weights), _native_headwise_library):
        return _NativeHeadwiseQKV.apply(x_c, x_m, *weights)
    return q_proj(x_c, impl), k_proj(x_c, impl), v_proj(x_m, impl)


class HeadwiseLinear(nn.Module):
    """Block-diagonal linear map: ``dim / block`` independent ``block x block`` matrices, no bias.

    ``weight`` is (num_blocks, out, in), the official ``LinearHeadwiseExpand`` layout. In float32
    on the CPU it runs as the C kernel ``blocks/csrc/headwise.c`` (a few multiply-adds per
    element); elsewhere as a grouped 1x1 convolution, which is faster than the einsum over
    blocks, but whose backward is the general convolution's (see "Native kernels").
    """

    def __init__(self, dim: int, block: int):
        super().__init__()
        self.dim, self.block = dim, block
        self.weight = nn.Parameter(torch.empty(dim // block, block, block))

    def forward(self, x: torch.Tensor, impl: str = "auto") -> torch.Tensor:
        """(B, S, dim) -> (B, S, dim). ``impl``: "native", "torch" (grouped conv) or "auto"."""
        if native.choose(impl, "headwise", (x, self.weight), _native_headwise_library):
            return _NativeHeadwise.apply(x, self.weight)
        kernel = self.weight.reshape(self.dim, self.block, 1, 1)
        y = F.conv2d(_channels_last(x), kernel, groups=self.dim // self.block)
        return _from_channels_last(y)


@register("mlstm")
class MLSTMBlock(Block):
    """xLSTM mLSTM block (pre-up-projection): ``x + proj_down(mLSTM-layer(LayerNorm(x)))``.

    Inside, with inner size ``I = proj_factor * d_model`` rounded up to a multiple of 64::

        x_m, z   = split(proj_up(x))                                  E -> 2I
        x_c      = SiLU(causal depthwise conv(x_m))                   kernel conv_kernel
        q, k, v  = headwise(x_c), headwise(x_c), headwise(x_m)        blocks of qkv_block_size
        i~, f~   = Linear(3I -> num_heads)([q, k, v])                 one gate value per head
        h~       = GroupNorm_heads(mLSTM cell(q, k, v, i~, f~))
        out      = proj_down((h~ + skip * x_c) * SiLU(z))             I -> E

    ``cell`` picks the form of the cell: "parallel", "chunkwise", "recurrent" (slow reference),
    "native" (the recurrent form as a C kernel; float32 on the CPU), or "auto": on the CPU in
    float32 native for heads up to ``LANES_MAX_HEAD`` (the eight-lane kernel) at any length; the
    row kernel beyond, on one thread for heads up to ``NATIVE_SMALL_HEAD`` at any length and for
    larger heads from ``NATIVE_MIN_SEQ`` steps (on more threads from ``NATIVE_MIN_SEQ`` steps, and
    beyond 128 for heads above ``NATIVE_SMALL_HEAD``); otherwise
    parallel up to ``AUTO_PARALLEL_MAX_CHUNKS * chunk_size`` steps on CPU (16 chunks on CUDA),
    chunkwise beyond; whichever measured faster.

    Parameters, shapes and initialisation follow NX-AI/xlstm 2.0.x (``mLSTMLayer``,
    ``mLSTMCell``), under the same names where there is one. Deliberate differences:

    - the group norm's weight is stored as the weight itself (init 1), not as ``1 + w`` (init 0):
      same function, but weight decay pulls it towards 0 rather than 1;
    - the parallel form's stabiliser includes the initial state's term (m_0 = 0), as the
      official recurrent and chunkwise forms do; the official parallel form leaves it out, which
      changes outputs only through eps, so all our forms agree to rounding;
    - no exponential can overflow: very negative input gates give tiny outputs, not inf/NaN;
    - speed only: q/k/v run as grouped 1x1 convolutions (the official code uses an einsum),
      proj_up as two products, and both gates in one product.
    """

    def __init__(
        self,
        d_model: int,
        max_len: int,
        *,
        block_index: int = 0,
        num_blocks: int = 1,
        num_heads: int = 4,
        proj_factor: float = 2.0,
        conv_kernel: int = 4,
        qkv_block_size: int = 4,
        chunk_size: int = 64,
        cell: str = "auto",
    ):
        super().__init__(d_model, max_len, block_index=block_index, num_blocks=num_blocks)
        _check(
            isinstance(proj_factor, (int, float)) and proj_factor > 0,
            f"proj_factor must be a number > 0, got {proj_factor!r}",
        )
        inner = round_up(proj_factor * d_model, 64)
        _check(
            isinstance(num_heads, int) and num_heads >= 1,
            f"num_heads must be a positive integer, got {num_heads!r}",
        )
        _check(
            inner % num_heads == 0,
            f"inner size {inner} (proj_factor {proj_factor} * d_model {d_model}, rounded up to "
            f"a multiple of 64) is not divisible by num_heads {num_heads}",
        )
        _check(
            isinstance(qkv_block_size, int) and qkv_block_size >= 1,
            f"qkv_block_size must be a positive integer, got {qkv_block_size!r}",
        )
        _check(
            inner % qkv_block_size == 0,
            f"inner size {inner} is not divisible by qkv_block_size {qkv_block_size}",
        )
        _check(
            isinstance(conv_kernel, int) and conv_kernel >= 1,
            f"conv_kernel must be a positive integer, got {conv_kernel!r}",
        )
        _check(
            isinstance(chunk_size, int) and chunk_size >= 1,
            f"chunk_size must be a positive integer, got {chunk_size!r}",
        )
        _check(cell in CELLS, f"cell must be one of {', '.join(CELLS)}; got {cell!r}")

        self.inner_dim = inner
        self.num_heads = num_heads
        self.head_dim = inner // num_heads
        self.conv_kernel = conv_kernel
        self.chunk_size = chunk_size
        self.cell = cell

        self.proj_up = nn.Linear(d_model, 2 * inner, bias=False)
        self.conv1d = nn.Conv1d(inner, inner, conv_kernel, groups=inner, bias=True)
        self.q_proj = HeadwiseLinear(inner, qkv_block_size)
        self.k_proj = HeadwiseLinear(inner, qkv_block_size)
        self.v_proj = HeadwiseLinear(inner, qkv_block_size)
        self.igate = nn.Linear(3 * inner, num_heads)
        self.fgate = nn.Linear(3 * inner, num_heads)
        self.outnorm_weight = nn.Parameter(torch.ones(inner))
        self.learnable_skip = nn.Parameter(torch.ones(inner))
        self.proj_down = nn.Linear(inner, d_model, bias=False)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """The official initialisation ("small" init, "wang" init for the down-projection)."""
        small_init_(self.proj_up.weight, self.d_model)
        for proj in (self.q_proj, self.k_proj, self.v_proj):
            small_init_(proj.weight, self.d_model)  # official: the embedding size, not the block's
        wang_init_(self.proj_down.weight, self.d_model, self.num_blocks)
        self.conv1d.reset_parameters()  # PyTorch's default, as in the official code
        nn.init.zeros_(self.igate.weight)
        nn.init.normal_(self.igate.bias, std=0.1)
        nn.init.zeros_(self.fgate.weight)
        with torch.no_grad():
            self.fgate.bias.copy_(torch.linspace(3.0, 6.0, self.num_heads))
        nn.init.ones_(self.outnorm_weight)
        nn.init.ones_(self.learnable_skip)

    def cell_for(
        self, seq_len: int, device: torch.device | str = "cpu", dtype: torch.dtype | None = None
    ) -> str:
        """The cell form used for sequences of ``seq_len`` steps on ``device``; the native
        kernel is a candidate only when ``dtype`` is float32 (the MLX twin passes none)."""
        lanes = self.head_dim <= LANES_MAX_HEAD
        native_ok = (dtype == torch.float32 and torch.device(device).type == "cpu"
                     and (_native_lanes_library() if lanes else _native_cell_library())
                     is not None)
        if self.cell == "native" and not native_ok:
            return "recurrent" if dtype == torch.float64 else "parallel"
        if self.cell != "auto":
            return self.cell
        if native_ok and (lanes or _row_kernel_pays(self.head_dim, seq_len)):
            return "native"
        cuda = torch.device(device).type == "cuda"
        max_chunks = AUTO_PARALLEL_MAX_CHUNKS_CUDA if cuda else AUTO_PARALLEL_MAX_CHUNKS
        return "parallel" if seq_len <= max_chunks * self.chunk_size else "chunkwise"

    def mix(self, x: torch.Tensor) -> torch.Tensor:
        B, S, _ = x.shape
        NH, DH, inner = self.num_heads, self.head_dim, self.inner_dim

        # two products instead of one and a split: x_m and z come out contiguous
        x_m = F.linear(x, self.proj_up.weight[:inner])
        z = F.linear(x, self.proj_up.weight[inner:])
        x_c = causal_depthwise_conv(x_m, self.conv1d.weight, self.conv1d.bias,
                                    activation="silu")
        q, k, v = headwise_qkv(x_c, x_m, self.q_proj, self.k_proj, self.v_proj)

        gate_weight = torch.cat([self.igate.weight, self.fgate.weight])
        gate_bias = torch.cat([self.igate.bias, self.fgate.bias])
        cell = self.cell_for(S, x.device, x.dtype)
        if cell == "native":  # the native kernels (float32 on the CPU) with the gates fused
            kernel = "lanes" if DH <= LANES_MAX_HEAD else "rows"
            h = _NativeGatedMLSTM.apply(q, k, v, gate_weight, gate_bias, NH, CELL_EPS, kernel)
        else:
            # (B, S, 2 NH); the cells take (B, NH, S) views of it (the native ones in place)
            gates = mlstm_gates(q, k, v, gate_weight, gate_bias)
            i_pre, f_pre = gates[..., :NH].transpose(1, 2), gates[..., NH:].transpose(1, 2)

            def heads(t: torch.Tensor) -> torch.Tensor:
                return t.view(B, S, NH, DH).transpose(1, 2)

            kwargs = {"chunk_size": self.chunk_size} if cell == "chunkwise" else {}
            h = _CELL_FNS[cell](heads(q), heads(k), heads(v), i_pre, f_pre, eps=CELL_EPS,
                                **kwargs)

        # multi-head group norm: each head normalised on its own, then one weight per channel
        # (B, S, NH, DH) order: the native cells write h in it, so this costs no copy there
        h = h.transpose(1, 2).reshape(B, S, inner)
        return self.proj_down(mlstm_output(h, x_c, z, self.outnorm_weight, self.learnable_skip, DH))

    def state_size(self, seq_len: int) -> int:
        """Floats of recurrent state per sequence at inference, independent of ``seq_len``.

        Zoology's convention: everything a step-by-step decoder must keep between tokens.
        Per head the matrix memory C (DQK x DV), the normaliser n (DQK) and the stabiliser m (1);
        plus the causal conv's last ``conv_kernel - 1`` inputs (I floats each).
        """
        dqk = dv = self.head_dim
        return self.num_heads * (dqk * dv + dqk + 1) + (self.conv_kernel - 1) * self.inner_dim


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise BlockError(f"mlstm: {message}")
