"""sLSTM: scalar-memory LSTM with exponential gating and memory mixing (xLSTM, Beck et al. 2024).

The cell, per unit and step, with raw = W x_t + R y_{t-1} + b split into ĩ, f̃, z̃, õ::

    lf  = m_{t-1} + logsigmoid(f̃)          forget gate, in log space
    m_t = max(ĩ, lf)        (= ĩ at t = 1)  stabiliser
    i'  = exp(ĩ - m_t);  f' = exp(lf - m_t)
    c_t = f' c_{t-1} + i' tanh(z̃)
    n_t = f' n_{t-1} + i'
    y_t = sigmoid(õ) c_t / n_t

R is block-diagonal per head (and per gate): units mix only with units of their own head.

Layouts follow NX-AI's ``xlstm`` package: gate pre-activations ``wx`` are ``(B, S, 4 * H)``
ordered gate-major ``[i | f | z | o]``, each gate head-major (``H = NH * DH``); the recurrent
kernel is ``R: (NH, DH_in, 4, DH_out)``; the bias ``b`` has ``4 * H`` entries in the order of
``wx``; the output ``y`` is ``(B, S, H)``, head-major.

Two forms of the cell, same inputs and outputs:

- :func:`slstm_recurrent_reference`: the equations above, one step at a time, plain autograd.
- :func:`slstm_scan`: the fast path the block uses. A custom autograd function steps forward
  once without building a graph, keeps the per-step gates and states, and runs the hand-derived
  backward-through-time recurrence in one loop. Everything that does not need the recurrence
  (gate derivatives, the gradients of ``wx``, ``R`` and ``b``) is computed for all steps at once.

The output never depends on the stabiliser m except through rounding (c and n both carry the
factor exp(-m_t)), so the backward treats m as a constant; the result equals autograd through
the max to rounding.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from blocks import native
from blocks.base import Block
from blocks.init import round_up, small_init_, wang_init_
from blocks.ops import causal_depthwise_conv, glu
from blocks.registry import BlockError, register

NUM_GATES = 4  # i, f, z, o


def _check_cell_inputs(
    wx: torch.Tensor, R: torch.Tensor, b: torch.Tensor, num_heads: int
) -> tuple[int, int, int, int]:
    if R.dim() != 4 or R.shape[0] != num_heads or R.shape[1:3] != (R.shape[3], NUM_GATES):
        raise ValueError(f"R must be (num_heads={num_heads}, DH, 4, DH), got {tuple(R.shape)}")
    NH, DH = R.shape[0], R.shape[1]
    H = NH * DH
    if wx.dim() != 3 or wx.shape[-1] != NUM_GATES * H:
        raise ValueError(f"wx must be (B, S, 4 * {H}), got {tuple(wx.shape)}")
    if b.numel() != NUM_GATES * H:
        raise ValueError(f"b must have 4 * {H} entries, got {tuple(b.shape)}")
    return wx.shape[0], wx.shape[1], NH, DH


def _compute_dtype(wx: torch.Tensor) -> torch.dtype:
    """Gate maths and states in float32, or float64 when the input is float64."""
    return torch.float64 if wx.dtype == torch.float64 else torch.float32


def slstm_recurrent_reference(
    wx: torch.Tensor, R: torch.Tensor, b: torch.Tensor, num_heads: int
) -> torch.Tensor:
    """The sLSTM cell as a plain step-by-step loop (autograd does the backward).

    ``wx: (B, S, 4H)`` input contributions ``W x_t`` (gate-major ``[i|f|z|o]``),
    ``R: (NH, DH, 4, DH)``, ``b: (4H,)``; returns ``y: (B, S, H)``. States start at zero.
    Slow; it is the readable definition the fast path is tested against.
    """
    B, S, NH, DH = _check_cell_inputs(wx, R, b, num_heads)
    H = NH * DH
    out_dtype, dtype = wx.dtype, _compute_dtype(wx)
    wx, R, b = wx.to(dtype), R.to(dtype), b.reshape(-1).to(dtype)

    y = wx.new_zeros(B, H)
    c = wx.new_zeros(B, H)
    n = wx.new_zeros(B, H)
    m = wx.new_zeros(B, H)
    ys = []
    for t in range(S):
        # memory mixing: each head's previous output feeds all four gates of that head
        Ry = torch.einsum("bnd,ndge->bgne", y.view(B, NH, DH), R).reshape(B, NUM_GATES * H)
        raw = wx[:, t] + Ry + b
        i_raw, f_raw, z_raw, o_raw = raw.chunk(NUM_GATES, dim=-1)
        log_f = m + F.logsigmoid(f_raw)
        m_new = i_raw if t == 0 else torch.maximum(i_raw, log_f)
        i_gate = torch.exp(i_raw - m_new)
        f_gate = torch.exp(log_f - m_new)
        c = f_gate * c + i_gate * torch.tanh(z_raw)
        n = f_gate * n + i_gate
        y = torch.sigmoid(o_raw) * c / n
        m = m_new
        ys.append(y)
    if not ys:
        return wx.new_zeros(B, 0, H).to(out_dtype)
    return torch.stack(ys, dim=1).to(out_dtype)


class _SLSTMScan(torch.autograd.Function):
    """Forward stepping without a graph; backward through time by hand.

    Layout is time-major and head-major, ``(S, NH, B, gate, DH)`` with gates ``[i, f, z, o]``,
    so one step's recurrent product for all heads is one in-place batched matmul
    ``raw_t += y_{t-1} @ R``. A step is a dozen small tensor operations (on CPU their count,
    not their size, sets the speed), each writing into a contiguous preallocated buffer that the
    backward reuses. Writing into non-contiguous ``out=`` views is avoided: PyTorch would
    compute into a temporary and copy.
    """

    @staticmethod
    def forward(ctx, wx_tm: torch.Tensor, R: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        """``wx_tm: (S, NH, B, G, DH)`` (any strides), ``R``, ``b`` -> ``y: (S, NH, B, DH)``."""
        NH, DH = R.shape[0], R.shape[1]
        S, B = wx_tm.shape[0], wx_tm.shape[2]
        G = NUM_GATES
        R_flat = R.reshape(NH, DH, G * DH)

        # raw[t, h, :, g] = W x_t + b for head h, gate g; y_{t-1} @ R is added at step t
        raw = wx_tm.new_empty(S, NH, B, G, DH)
        torch.add(wx_tm, b.view(G, NH, 1, DH).permute(1, 2, 0, 3), out=raw)
        # Kept for the backward, per step: sigmoid of (f~, z~, o~) (that of z~ is unused, but
        # one call over adjacent slots beats two); (i', f'); (tanh(z~), 1); states (c, n) and y
        # with the zero state at index 0.
        sig = raw.new_empty(S, NH, B, 3, DH)
        gates = raw.new_empty(S, NH, B, 2, DH)
        tanh_z1 = raw.new_empty(S, 2, NH, B, DH)
        tanh_z1[:, 1] = 1.0
        cn = raw.new_zeros(S + 1, 2, NH, B, DH)
        y = raw.new_zeros(S + 1, NH, B, DH)
        m = raw.new_empty(NH, B, DH)  # stabiliser, overwritten each step
        m_u = m.unsqueeze(2)

        # per-step views, made once (indexing inside the loop costs as much as an operation)
        raw_t = raw.view(S, NH, B, G * DH).unbind(0)
        raw_i, raw_f, raw_z = (raw[:, :, :, k].unbind(0) for k in range(3))
        raw_if, raw_fzo = raw[:, :, :, 0:2].unbind(0), raw[:, :, :, 1:4].unbind(0)
        sig_t, sig_f, sig_o = sig.unbind(0), sig[:, :, :, 0].unbind(0), sig[:, :, :, 2].unbind(0)
        gates_t, i_gate, f_gate = (
            gates.unbind(0),
            gates[:, :, :, 0].unbind(0),
            gates[:, :, :, 1].unbind(0),
        )
        tanh_z1_t, tanh_z = tanh_z1.unbind(0), tanh_z1[:, 0].unbind(0)
        cn_t, c, n = cn.unbind(0), cn[:, 0].unbind(0), cn[:, 1].unbind(0)
        y_t = y.unbind(0)

        # First step: no history, so m = ĩ, i' = 1, f' is irrelevant (0), c = tanh(z~), n = 1.
        torch.sigmoid(raw_fzo[0], out=sig_t[0])
        m.copy_(raw_i[0])
        gates[0, :, :, 0] = 1.0
        gates[0, :, :, 1] = 0.0
        torch.tanh(raw_z[0], out=tanh_z[0])
        cn_t[1].copy_(tanh_z1_t[0])
        torch.mul(sig_o[0], c[1], out=y_t[1])

        for t in range(1, S):
            raw_t[t].baddbmm_(y_t[t], R_flat)  # + R y_{t-1}, all heads and gates at once
            torch.sigmoid(raw_fzo[t], out=sig_t[t])
            raw_f[t].copy_(sig_f[t]).log_().add_(m)  # f~ slot now holds lf = m + logsigmoid(f~)
            torch.maximum(raw_i[t], raw_f[t], out=m)
            torch.exp(raw_if[t] - m_u, out=gates_t[t])  # (i', f') = exp((ĩ, lf) - m)
            torch.tanh(raw_z[t], out=tanh_z[t])
            # (c, n) = f' (c, n) + i' (tanh(z~), 1)
            torch.mul(cn_t[t], f_gate[t], out=cn_t[t + 1]).addcmul_(tanh_z1_t[t], i_gate[t])
            torch.mul(sig_o[t], c[t + 1], out=y_t[t + 1]).div_(n[t + 1])

        ctx.save_for_backward(R, sig, gates, tanh_z1, cn, y)
        return y[1:]  # a view of the saved buffer: an in-place change of it fails the backward

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_y: torch.Tensor):
        R, sig, gates, tanh_z1, cn, y_all = ctx.saved_tensors
        S, NH, B, _, DH = sig.shape
        G = NUM_GATES

        # Local derivatives for all steps at once (m held constant, see the module docstring).
        # With dc, dn the gradients w.r.t. c_t, n_t and dy the total one w.r.t. y_t:
        #   d raw_t[i, f, z, o] = dc * k_c + dn * (k_n, 0, 0) + dy * (0, 0, 0, k_y)
        sig_f, sig_o = sig[:, :, :, 0], sig[:, :, :, 2]
        i_gate, f_gate = gates.unbind(3)
        tanh_z = tanh_z1[:, 0]
        c_prev, n_prev = cn[:-1, 0], cn[:-1, 1]
        n, y = cn[1:, 1], y_all[1:]
        df_scale = f_gate * (1.0 - sig_f)  # d f' / d f~ (d logsigmoid(x) / dx = 1 - sigmoid(x))
        k_c = torch.stack(
            (
                tanh_z * i_gate,  # d c / d ĩ (through i')
                c_prev * df_scale,  # d c / d f~ (through f')
                i_gate * (1.0 - tanh_z * tanh_z),  # d c / d z~
                torch.zeros_like(y),
            ),
            dim=3,
        )
        k_n = torch.stack((i_gate, n_prev * df_scale), dim=3)
        k_y = y * (1.0 - sig_o)  # d y / d õ
        dy_dcn = torch.stack((sig_o / n, -y / n), dim=1)  # d y_t / d (c_t, n_t)
        f_next = f_gate.contiguous()
        del df_scale

        dy_out = grad_y.to(sig.dtype).contiguous()  # (S, NH, B, DH)
        d_raw = sig.new_empty(S, NH, B, G, DH)
        R_T = R.reshape(NH, DH, G * DH).transpose(1, 2)  # (NH, 4DH, DH)
        dy = sig.new_empty(NH, B, DH)  # gradient w.r.t. y_t: from the output and from step t+1
        d_cn = sig.new_zeros(2, NH, B, DH)  # gradient w.r.t. (c_t, n_t), carried backwards
        dc_u, dn_u = d_cn[0].unsqueeze(2), d_cn[1].unsqueeze(2)

        d_raw_t, d_raw_flat = d_raw.unbind(0), d_raw.view(S, NH, B, G * DH).unbind(0)
        d_raw_if, d_raw_o = d_raw[:, :, :, 0:2].unbind(0), d_raw[:, :, :, 3].unbind(0)
        dy_out_t, dy_dcn_t, f_next_t = dy_out.unbind(0), dy_dcn.unbind(0), f_next.unbind(0)
        k_c_t, k_n_t, k_y_t = k_c.unbind(0), k_n.unbind(0), k_y.unbind(0)
        for t in range(S - 1, -1, -1):
            if t == S - 1:
                dy.copy_(dy_out_t[t])
            else:
                torch.baddbmm(dy_out_t[t], d_raw_flat[t + 1], R_T, out=dy)  # + R^T d raw_{t+1}
                d_cn.mul_(f_next_t[t + 1])  # c_{t+1} = f'_{t+1} c_t + ..., n likewise
            d_cn.addcmul_(dy_dcn_t[t], dy)
            torch.mul(dc_u, k_c_t[t], out=d_raw_t[t])
            d_raw_if[t].addcmul_(dn_u, k_n_t[t])
            d_raw_o[t].addcmul_(dy, k_y_t[t])

        return (d_raw if ctx.needs_input_grad[0] else None,
                *_recurrent_and_bias_grads(ctx, d_raw, y_all))


def _native_library():
    I64, PTR = native.I64, native.PTR
    return native.library("slstm", {"mad_slstm_fwd": [I64] * 7 + [PTR] * 8,
                                    "mad_slstm_bwd": [I64] * 6 + [PTR] * 11})


class _NativeSLSTMScan(torch.autograd.Function):
    """:class:`_SLSTMScan`'s maths by the C kernel ``blocks/csrc/slstm.c`` (float32, CPU).

    The whole step, memory mixing included, runs per lane (head x batch element) with its state
    in registers; the forward keeps the pre-activations and the states (c, n, m, y), and the
    backward recomputes the gates from them, and sums ``d R`` and ``d b`` over the steps and the
    batch as it goes (per thread; the threads' sums are added here).
    """

    @staticmethod
    def forward(ctx, wx_tm: torch.Tensor, R: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        lib = _native_library()
        S, NH, B, G, DH = wx_tm.shape
        P = NH * B
        wx = wx_tm.contiguous()
        Rc = R.contiguous()
        bc = b.contiguous()
        raw = torch.empty_like(wx)
        m = wx.new_empty(S, NH, B, DH)
        c, n, y = (wx.new_zeros(S + 1, NH, B, DH) for _ in range(3))
        p = native.pointer

        def run(slot, p0, p1):
            lib.mad_slstm_fwd(p0, p1, S, P, B, DH, NH, p(wx), p(Rc), p(bc), p(raw), p(m), p(c),
                              p(n), p(y))

        native.parallel(P, run)
        ctx.save_for_backward(R, raw, m, c, n, y)
        return y[1:]  # a view of the saved buffer: an in-place change of it fails the backward

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_y: torch.Tensor):
        lib = _native_library()
        R, raw, m, c, n, y_all = ctx.saved_tensors
        S, NH, B, G, DH = raw.shape
        P = NH * B
        dy = grad_y.contiguous()
        d_raw = torch.empty_like(raw)
        RT = R.reshape(NH, DH, G * DH).transpose(1, 2).contiguous()  # (NH, G DH_out, DH_in)
        ws = raw.new_empty(P, 4 * DH)  # per lane: dy, dc, dn, f' of the step after
        # the recurrent weights' and bias's gradients, summed by the kernel per thread
        slots = native.slots(P)
        need_R, need_b = ctx.needs_input_grad[1], ctx.needs_input_grad[2]
        d_R = raw.new_zeros(slots, NH, DH, G * DH) if need_R else None
        d_b = raw.new_zeros(slots, NH, G * DH) if need_b else None
        p = native.pointer

        def run(slot, p0, p1):
            lib.mad_slstm_bwd(p0, p1, S, P, B, DH, p(RT), p(raw), p(m), p(c), p(n), p(y_all),
                              p(dy), p(d_raw), p(ws[p0]), None if d_R is None else p(d_R[slot]),
                              None if d_b is None else p(d_b[slot]))

        native.parallel(P, run)
        if d_R is not None:
            d_R = d_R.sum(0).view(NH, DH, G, DH)
        if d_b is not None:  # b is (4H,) gate-major: [gate, head, unit]
            d_b = d_b.sum(0).view(NH, G, DH).transpose(0, 1).reshape(-1)
        return d_raw if ctx.needs_input_grad[0] else None, d_R, d_b


def _recurrent_and_bias_grads(ctx, d_raw: torch.Tensor, y_all: torch.Tensor):
    """``d R[h] = sum over steps and batch of y_{t-1}^T d raw_t`` and ``d b``, each where
    needed; ``d_raw: (S, NH, B, G, DH)``, ``y_all: (S + 1, NH, B, DH)`` (zero state first)."""
    S, NH, B, G, DH = d_raw.shape
    d_R = d_b = None
    if ctx.needs_input_grad[2]:  # b is (4H,) gate-major: [gate, head, unit]
        d_b = d_raw.sum(dim=(0, 2)).transpose(0, 1).reshape(-1)
    if ctx.needs_input_grad[1]:
        y_prev = y_all[:-1].permute(1, 3, 0, 2).reshape(NH, DH, S * B)
        d_raw_h = d_raw.view(S, NH, B, G * DH).transpose(0, 1).reshape(NH, S * B, G * DH)
        d_R = torch.bmm(y_prev, d_raw_h).view(NH, DH, G, DH)
    return d_R, d_b


def slstm_scan(
    wx: torch.Tensor, R: torch.Tensor, b: torch.Tensor, num_heads: int, impl: str = "auto"
) -> torch.Tensor:
    """The sLSTM cell, fast path: same inputs and output as :func:`slstm_recurrent_reference`.

    ``wx: (B, S, 4H)``, ``R: (NH, DH, 4, DH)``, ``b: (4H,)`` -> ``y: (B, S, H)``. Computes in
    float32 (float64 for float64 input) and returns ``wx``'s dtype. ``impl`` as in
    :func:`slstm_scan_time_major`.
    """
    B, S, NH, DH = _check_cell_inputs(wx, R, b, num_heads)
    if S == 0:
        return wx.new_zeros(B, 0, NH * DH)
    wx_tm = wx.view(B, S, NUM_GATES, NH, DH).permute(1, 3, 0, 2, 4)
    y = slstm_scan_time_major(wx_tm, R, b, impl=impl)
    return y.permute(2, 0, 1, 3).reshape(B, S, NH * DH)


def slstm_scan_time_major(
    wx_tm: torch.Tensor, R: torch.Tensor, b: torch.Tensor, impl: str = "auto"
) -> torch.Tensor:
    """:func:`slstm_scan` in the scan's own layout, which spares the block two full copies.

    ``wx_tm: (S, NH, B, 4, DH)`` (gates ``[i, f, z, o]``), ``R: (NH, DH, 4, DH)``, ``b: (4H,)``
    -> ``y: (S, NH, B, DH)``; the gradient of ``wx_tm`` comes back contiguous in that layout.
    ``impl``: ``"native"`` the C kernel (float32 on the CPU), ``"torch"`` the scan of torch
    operators, ``"auto"`` the C kernel where it is loaded and applies.
    """
    if impl not in ("auto", "native", "torch"):
        raise ValueError(f"impl must be 'auto', 'native' or 'torch', got {impl!r}")
    if wx_tm.shape[0] == 0:
        return wx_tm.new_zeros(0, *wx_tm.shape[1:3], wx_tm.shape[-1])
    dtype = _compute_dtype(wx_tm)
    args = (wx_tm.to(dtype), R.to(dtype), b.reshape(-1).to(dtype))
    if native.choose(impl, "slstm", args, _native_library):
        y = _NativeSLSTMScan.apply(*args)
    else:
        y = _SLSTMScan.apply(*args)
    return y.to(wx_tm.dtype)


def _native_proj_library():
    I64, PTR = native.I64, native.PTR
    return native.library("slstm_proj", {"mad_slstm_proj_fwd": [I64] * 6 + [PTR] * 4,
                                         "mad_slstm_proj_bwd": [I64] * 6 + [PTR] * 7})


class _NativeProjections(torch.autograd.Function):
    """:func:`slstm_projections` by the C kernel ``blocks/csrc/slstm_proj.c``."""

    @staticmethod
    def forward(ctx, x_c, x, w_i, w_f, w_z, w_o):
        lib = _native_proj_library()
        B, S, _ = x.shape
        NH, DH = w_i.shape[0], w_i.shape[1]
        x_c, x = x_c.contiguous(), x.contiguous()
        W = torch.stack((w_i, w_f, w_z, w_o))  # (4, NH, DH_out, DH_in)
        WT = W.transpose(2, 3).contiguous()
        wx = x.new_empty(S, NH, B, NUM_GATES, DH)
        p = native.pointer
        native.parallel(B, lambda slot, b0, b1: lib.mad_slstm_proj_fwd(
            b0, b1, B, S, NH, DH, p(x_c), p(x), p(WT), p(wx)))
        ctx.save_for_backward(x_c, x, W)
        return wx

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dwx):
        lib = _native_proj_library()
        x_c, x, W = ctx.saved_tensors
        B, S, _ = x.shape
        NH, DH = W.shape[1], W.shape[2]
        dwx = dwx.contiguous()
        dxc, dx = torch.empty_like(x_c), torch.empty_like(x)
        dW = W.new_zeros(native.slots(B), *W.shape)
        p = native.pointer
        native.parallel(B, lambda slot, b0, b1: lib.mad_slstm_proj_bwd(
            b0, b1, B, S, NH, DH, p(x_c), p(x), p(W), p(dwx), p(dxc), p(dx), p(dW[slot])))
        return dxc, dx, *dW.sum(0).unbind(0)


def _native_norm_library():
    I64, F32, PTR = native.I64, native.F32, native.PTR
    return native.library("slstm_norm", {"mad_slstm_norm_fwd": [I64] * 6 + [F32] + [PTR] * 4,
                                         "mad_slstm_norm_bwd": [I64] * 6 + [PTR] * 6})


class _NativeGroupNorm(torch.autograd.Function):
    """:func:`slstm_group_norm` by the C kernel ``blocks/csrc/slstm_norm.c``."""

    @staticmethod
    def forward(ctx, y_tm, weight, eps):
        lib = _native_norm_library()
        S, NH, B, DH = y_tm.shape
        y, w = y_tm.contiguous(), weight.contiguous()
        out = y.new_empty(B, S, NH * DH)
        stats = y.new_empty(S, NH, B, 2)
        p = native.pointer
        native.parallel(S * NH * B, lambda slot, r0, r1: lib.mad_slstm_norm_fwd(
            r0, r1, S, NH, B, DH, eps, p(y), p(w), p(out), p(stats)))
        ctx.save_for_backward(y, w, stats)
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, d_out):
        lib = _native_norm_library()
        y, w, stats = ctx.saved_tensors
        S, NH, B, DH = y.shape
        d_out = d_out.contiguous()
        dy = torch.empty_like(y)
        rows = S * NH * B
        slots = native.slots(rows)
        dw = w.new_zeros(slots, *w.shape)
        p = native.pointer
        native.parallel(rows, lambda slot, r0, r1: lib.mad_slstm_norm_bwd(
            r0, r1, S, NH, B, DH, p(y), p(w), p(stats), p(d_out), p(dy), p(dw[slot])))
        return dy, (dw[0] if slots == 1 else dw.sum(0)), None


def slstm_group_norm(y_tm: torch.Tensor, weight: torch.Tensor, eps: float = 1e-5,
                     impl: str = "auto") -> torch.Tensor:
    """The sLSTM block's multi-head group norm on the scan's output, in the block's layout.

    ``y_tm: (S, NH, B, DH)`` (:func:`slstm_scan_time_major`), ``weight: (NH * DH,)``; each head's
    units normalised on their own (a layer norm without affine, as F.layer_norm), times one
    weight per unit; returns ``(B, S, NH * DH)``. ``impl``: ``"native"`` the C kernel
    ``blocks/csrc/slstm_norm.c`` (float32 on the CPU), ``"torch"`` torch's operators, ``"auto"``
    the C kernel where it is loaded and applies.
    """
    S, NH, B, DH = y_tm.shape
    w = weight.view(NH, DH)
    if native.choose(impl, "slstm_norm", (y_tm, weight), _native_norm_library):
        return _NativeGroupNorm.apply(y_tm, w, float(eps))
    y = F.layer_norm(y_tm, (DH,), eps=eps) * w.view(NH, 1, DH)
    return y.permute(2, 0, 1, 3).reshape(B, S, NH * DH)


def slstm_projections(
    x_c: torch.Tensor,
    x: torch.Tensor,
    w_i: torch.Tensor,
    w_f: torch.Tensor,
    w_z: torch.Tensor,
    w_o: torch.Tensor,
    impl: str = "auto",
) -> torch.Tensor:
    """The sLSTM's four headwise input projections, in the scan's layout.

    ``x_c, x: (B, S, NH*DH)``; weights ``(NH, DH_out, DH_in)``; returns ``wx_tm (S, NH, B, 4,
    DH)``: gates i and f from ``x_c``, z and o from ``x``. ``impl``: ``"native"`` the C kernel
    ``blocks/csrc/slstm_proj.c`` (float32 on the CPU, heads of 8, 16, ... 64), ``"torch"`` batched
    products, ``"auto"`` the C kernel where it is loaded and applies.
    """
    B, S, _ = x.shape
    NH, DH = w_i.shape[0], w_i.shape[1]
    unsupported = (None if DH % 8 == 0 and DH <= 64
                   else f"the native sLSTM projections take heads that are multiples of 8 up to "
                        f"64, got {DH}")
    if native.choose(impl, "slstm_proj", (x_c, x, w_i, w_f, w_z, w_o), _native_proj_library,
                     unsupported):
        return _NativeProjections.apply(x_c, x, w_i, w_f, w_z, w_o)

    def headwise(u, w_a, w_b):  # (S, NH, B, 2 DH)
        u_tm = u.view(B, S, NH, DH).permute(1, 2, 0, 3)
        return torch.matmul(u_tm, torch.cat((w_a, w_b), dim=1).transpose(1, 2))

    return torch.cat((headwise(x_c, w_i, w_f), headwise(x, w_z, w_o)), dim=-1).view(
        S, NH, B, NUM_GATES, DH)


def powerlaw_forget_bias(head_dim: int, block_index: int, num_blocks: int) -> torch.Tensor:
    """xLSTM's block-dependent forget-gate bias for one head: 5 - 12 (j / (DH-1))^(0.3 + 1.3 r).

    ``j`` runs over the units of a head (``0 .. DH-1``), the same values in every head;
    ``r = block_index / (num_blocks - 1)`` (0 for a single block). Deeper blocks keep their
    forget gates open (large bias) on more units, i.e. remember longer.
    """
    ratio = block_index / (num_blocks - 1) if num_blocks > 1 else 0.0
    position = torch.arange(head_dim, dtype=torch.float32) / max(head_dim - 1, 1)
    return 5.0 - 12.0 * position ** (0.3 + 1.3 * ratio)


@register("slstm")
class SLSTMBlock(Block):
    """xLSTM's sLSTM block (post-up-projection): ``x += sLSTM(LN1(x)); x += FFN(LN2(x))``.

    sLSTM layer: ``x_c = SiLU(causal depthwise conv(x))``; ĩ, f̃ from ``x_c`` and z̃, õ from
    ``x`` through headwise (block-diagonal, bias-free) projections; the cell (bias ``b``,
    recurrent ``R``); multi-head group norm (weight only); no output projection.
    FFN: gated GELU, ``down(GELU(gate(u)) * up(u))``, width ``ffn_factor * d_model`` rounded up
    to a multiple of 64, no biases. Defaults follow NX-AI's ``xlstm`` (``ffn_factor`` 1.3).
    """

    def __init__(
        self,
        d_model: int,
        max_len: int,
        *,
        block_index: int = 0,
        num_blocks: int = 1,
        num_heads: int = 4,
        conv_kernel: int = 4,
        ffn_factor: float = 1.3,
    ):
        super().__init__(d_model, max_len, block_index=block_index, num_blocks=num_blocks)
        if not isinstance(num_heads, int) or num_heads <= 0 or d_model % num_heads != 0:
            raise BlockError(
                f"slstm: num_heads must be a positive divisor of d_model={d_model}, "
                f"got {num_heads!r}"
            )
        if not isinstance(conv_kernel, int) or conv_kernel < 0:
            raise BlockError(
                f"slstm: conv_kernel must be an integer >= 0 (0: no conv), got {conv_kernel!r}"
            )
        if not ffn_factor > 0:
            raise BlockError(f"slstm: ffn_factor must be positive, got {ffn_factor!r}")
        if not 0 <= block_index < max(num_blocks, 1):
            raise BlockError(
                f"slstm: block_index must be in [0, num_blocks={num_blocks}), got {block_index}"
            )
        self.num_heads = num_heads
        self.head_dim = DH = d_model // num_heads
        self.conv_kernel = conv_kernel

        # sLSTM layer
        if conv_kernel > 0:
            self.conv = nn.Conv1d(d_model, d_model, conv_kernel, groups=d_model, bias=True)
        # headwise input projections, (head, out, in) per gate
        self.w_i = nn.Parameter(torch.empty(num_heads, DH, DH))
        self.w_f = nn.Parameter(torch.empty(num_heads, DH, DH))
        self.w_z = nn.Parameter(torch.empty(num_heads, DH, DH))
        self.w_o = nn.Parameter(torch.empty(num_heads, DH, DH))
        self.R = nn.Parameter(torch.zeros(num_heads, DH, NUM_GATES, DH))  # (head, in, gate, out)
        self.b = nn.Parameter(torch.zeros(NUM_GATES, num_heads, DH))  # (gate, head, unit)
        self.group_norm_weight = nn.Parameter(torch.ones(d_model))

        # gated feed-forward sub-block
        self.ffn_norm = nn.LayerNorm(d_model, bias=False)
        self.ffn_hidden = round_up(ffn_factor * d_model, 64)
        self.ffn_up = nn.Linear(d_model, 2 * self.ffn_hidden, bias=False)  # [gate | up]
        self.ffn_down = nn.Linear(self.ffn_hidden, d_model, bias=False)

        self.reset_parameters()

    def reset_parameters(self) -> None:
        """xLSTM's init: small init for projections, wang for the FFN down-projection, R = 0,
        power-law block-dependent forget bias, other biases 0; conv and norms at their defaults."""
        if self.conv_kernel > 0:
            self.conv.reset_parameters()
        self.norm.reset_parameters()
        self.ffn_norm.reset_parameters()
        for w in (self.w_i, self.w_f, self.w_z, self.w_o):
            small_init_(w, self.d_model)
        with torch.no_grad():
            self.R.zero_()
            self.b.zero_()
            self.b[1] = powerlaw_forget_bias(self.head_dim, self.block_index, self.num_blocks)
            self.group_norm_weight.fill_(1.0)
        small_init_(self.ffn_up.weight, self.d_model)
        wang_init_(self.ffn_down.weight, self.d_model, self.num_blocks)

    def mix(self, x: torch.Tensor) -> torch.Tensor:
        """The sLSTM layer on the normalised input ``x: (B, S, d_model)``."""
        B, S, D = x.shape
        if self.conv_kernel > 0:
            x_c = causal_depthwise_conv(x, self.conv.weight, self.conv.bias,
                                        activation="silu")
        else:
            x_c = x
        wx_tm = slstm_projections(x_c, x, self.w_i, self.w_f, self.w_z, self.w_o)
        y = slstm_scan_time_major(wx_tm, self.R, self.b.reshape(-1))  # (S, NH, B, DH)
        # multi-head group norm: each head's units normalised on their own, one weight per unit
        return slstm_group_norm(y, self.group_norm_weight, eps=1e-5)

    def ffn(self, u: torch.Tensor) -> torch.Tensor:
        return self.ffn_down(glu(self.ffn_up(u), "gelu"))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.mix(self.norm(x))
        return x + self.ffn(self.ffn_norm(x))

    def state_size(self, seq_len: int) -> int:
        """Floats per sequence at inference: the cell's c, n, m and y (d_model each), plus the
        causal conv's window of the last ``conv_kernel - 1`` inputs. Independent of seq_len."""
        conv_state = max(self.conv_kernel - 1, 0) * self.d_model
        return 4 * self.d_model + conv_state
