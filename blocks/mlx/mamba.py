"""MLX twin of :mod:`blocks.mamba`: the selective state-space block (Gu & Dao 2023).

Per inner channel d and state index n, with u = SiLU(causal_conv(x))::

    Δ_t = softplus(W_Δ (W_x u_t)[:R] + b_Δ);   B_t, C_t = (W_x u_t)[R:R+N], (W_x u_t)[R+N:]
    h_t[d, n] = exp(Δ_t[d] A[d, n]) h_{t-1}[d, n] + Δ_t[d] u_t[d] B_t[n]
    y_t[d]    = Σ_n C_t[n] h_t[d, n] + D[d] u_t[d];   out_t = W_out (y_t ⊙ SiLU(z_t))

A = -exp(A_log) (S4D-real init A[d, n] = -(n + 1)); softplus(b_Δ) starts log-uniform in
[dt_min, dt_max].

Why the code looks the way it does (MLX 0.32's CPU backend, measured on x86-64, one thread).
Forward + backward is a few passes over (batch, seq, d_inner, d_state) tensors, and:

- MLX's transcendentals are scalar code (``mx.exp`` ~25 ns a float32, ``mx.sigmoid`` ~40,
  ``nn.softplus`` ~60; torch ~3), while ``mx.compile`` turns a chain of plain arithmetic on
  contiguous arrays into one loop that gcc vectorises (well under 1 ns an element and
  operation). So exp(x), x <= 0, is such a chain (:func:`_exp_nonpositive`: 2**k from the
  exponent bits times a polynomial), and the decays, SiLU, softplus and the output gate use it.
- ``mx.compile`` runs the uncompiled graph when its inputs are autodiff tracers (under
  ``mx.grad``), and in a custom VJP it always does. So the custom functions here evaluate their
  inputs and run their compiled kernels on plain copies (:func:`_detached`), and those kernels
  also compute what the backward needs (derivatives, factors of the scan's gradients): the
  hand-written VJPs are a few plain products and reductions.
- every op costs ~10 µs of dispatch, fresh tensors above ~32 MB are page-faulted in on every
  call, and the autodiff of a slice scatters into a zero tensor of the full size. So the scan
  runs one time step at a time on cache-sized (1, batch, d_state, d_inner) slices (channels
  last: every broadcast is along whole rows), reads its inputs through one ``mx.split`` each,
  and keeps what its backward needs per step; the convolution has a hand-written VJP.

The step-by-step scan is exact (no chunks, no products of decays across steps): the torch
block's ``chunk_size`` (the schedule of its two-level scan) changes nothing here.
Inside ``mx.compile`` or ``mx.vmap`` nothing can be evaluated early; the same code then runs
traced: the same results, without the speed.
"""

from __future__ import annotations

import inspect
import math

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from blocks.mlx.base import Block, linear, small_init, uniform, wang_init
from blocks.mlx.short_conv import DepthwiseConv1d
from blocks.registry import register

# --- exp(x) for x <= 0 as vectorisable arithmetic ----------------------------------------------

_LOG2E = 1.4426950408889634
_ROUND = 12582912.0  # 1.5 * 2**23: (t + _ROUND) - _ROUND rounds t to the nearest integer
# 2**f on [-1/2, 1/2] (Cephes exp2f), lowest degree first
_EXP2 = (1.0, 6.931472028550421e-1, 2.402264791363012e-1, 5.550332471162809e-2,
         9.618437357674640e-3, 1.339887440266574e-3, 1.535336188319500e-4)


def _exp2_fraction(x):
    """f = x log2(e) - k with k the nearest integer, in [-1/2, 1/2] for any finite x."""
    t = x * _LOG2E
    return t - ((t + _ROUND) - _ROUND)


def _exp2_bits(x):
    """The int32 bit pattern of 2**k (k as in :func:`_exp2_fraction`), k clamped to
    [-127, 127]; k = -127 gives the pattern of 0.0, so exp of anything below ~-87.7 is 0."""
    k = (x * _LOG2E + _ROUND) - _ROUND
    return (mx.minimum(mx.maximum(k.astype(mx.int32), -127), 127) + 127) << 23


def _exp2_poly(f):
    c = _EXP2
    f2 = f * f
    f4 = f2 * f2  # Estrin's scheme: shallow enough for mx.compile to fuse in one loop
    return (c[0] + c[1] * f) + f2 * (c[2] + c[3] * f) + f4 * ((c[4] + c[5] * f) + f2 * c[6])


def _exp_nonpositive(x):
    """exp(x) for x <= 0 from float32 arithmetic only: 2**k 2**f. Relative error below 2e-7 for
    x in [-1, 0], 6e-7 above -10, 4e-6 down to -87 (the rounding of x log2(e), as in
    ``mx.exp``); absolute error below 1e-7. Exactly 0 below about -87.7 (``mx.exp``: -88)."""
    x = mx.where(x < -104.0, -104.0, x)  # (x log2(e) overflows near -2.4e38; NaN stays NaN)
    return _exp2_poly(_exp2_fraction(x)) * _exp2_bits(x).view(mx.float32)


def _sigmoid(x):
    e = _exp_nonpositive(-mx.abs(x))
    return mx.where(x >= 0, 1.0, e) / (1.0 + e)  # 1/(1+e) or e/(1+e): no cancellation


# log1p(e) = 2 atanh(z), z = e/(2+e) <= 1/3 for e in [0, 1]: the series in z² to z¹⁵
_ATANH = tuple(1.0 / (2 * k + 1) for k in range(8))


def _log1p_unit(e):
    """log(1 + e) for e in [0, 1], relative error ~1e-7."""
    z = e / (2.0 + e)
    w = z * z
    w2 = w * w
    w4 = w2 * w2
    c = _ATANH
    p = ((c[0] + c[1] * w) + w2 * (c[2] + c[3] * w)) + w4 * (
        (c[4] + c[5] * w) + w2 * (c[6] + c[7] * w))
    return 2.0 * z * p


def _silu_forward(x):
    """silu(x) and its derivative s (1 + x (1 - s)), s = sigmoid(x)."""
    s = _sigmoid(x)
    return x * s, s * (1.0 + x * (1.0 - s))


def _gate_forward(y, z):
    """y silu(z) and its derivatives silu(z) (by y) and y silu'(z) (by z)."""
    s = _sigmoid(z)
    silu_z = z * s
    return y * silu_z, silu_z, y * (s * (1.0 + z * (1.0 - s)))


def _softplus_forward(x):
    """softplus(x) = max(x, 0) + log1p(exp(-|x|)) and its derivative sigmoid(x)."""
    return mx.where(x > 0, x, 0.0) + _log1p_unit(_exp_nonpositive(-mx.abs(x))), _sigmoid(x)


# --- the scan's step kernel (all arguments (1, batch, d_state, d_inner), contiguous) ----------

def _scan_step(delta, h, b, a_mat):
    """One step of the scan: the decay a = exp(Δ_t A), the new state a h + b, and for the
    backward q = a h A and s = a h Δ_t (with the adjoint g_t: dL/dΔ_t = Σ_n g q + ...,
    dL/dA = Σ g s)."""
    a = _exp_nonpositive(delta * a_mat)
    p = a * h
    return a, p + b, p * a_mat, p * delta


_KERNELS = {f.__name__: f for f in (_silu_forward, _gate_forward, _softplus_forward, _scan_step)}
_compiled: dict | None = None


def _kernel(name: str):
    """The kernel ``name``, ``mx.compile``'d where compiling works (on the CPU it needs a C++
    compiler at run time; probed once, and without one the plain graph of ops runs)."""
    global _compiled
    if _compiled is None:
        try:
            probe = mx.compile(_exp_nonpositive)(-mx.arange(3, dtype=mx.float32))
            mx.eval(probe)
            ok = abs(float(probe[1]) - math.exp(-1.0)) < 1e-6
        except ValueError as exc:
            if "transformation" in str(exc):  # called inside mx.compile / vmap: decide later
                return _KERNELS[name]
            ok = False
        except Exception:  # no compiler, or a backend that cannot compile
            ok = False
        _compiled = {k: (mx.compile(f) if ok else f) for k, f in _KERNELS.items()}
    return _compiled[name]


def _detached(*xs: mx.array) -> tuple[mx.array, ...]:
    """Evaluated copies of ``xs`` that are not autodiff tracers, so that compiled kernels run on
    them in a forward pass under ``mx.grad`` (custom functions only: their VJPs give the
    gradients). Inside ``mx.compile`` or ``mx.vmap`` the arrays come back unchanged."""
    try:
        mx.eval(*xs)
    except (ValueError, RuntimeError):  # "[eval] ... during function transformations ..."
        return xs
    return tuple(mx.array(np.asarray(x)) for x in xs)


def _elementwise(kernel: str):
    """A custom function from ``kernel``, which returns the value and its derivative by each
    argument; the VJP multiplies the cotangent by those."""

    def fwd(*args):
        return _kernel(kernel)(*_detached(*args))

    def vjp(primals, cotangents, outputs):
        grads = tuple(cotangents[0] * d for d in outputs[1:])
        return grads if len(grads) > 1 else grads[0]

    fn = mx.custom_function(fwd)
    fn.vjp(vjp)
    return fn


_silu_fn = _elementwise("_silu_forward")
_gate_fn = _elementwise("_gate_forward")
_softplus_fn = _elementwise("_softplus_forward")


def silu(x: mx.array) -> mx.array:
    """x sigmoid(x), as ``nn.silu`` (float32: the fast kernels; other types: ``nn.silu``)."""
    return _silu_fn(x)[0] if x.dtype == mx.float32 else nn.silu(x)


def softplus(x: mx.array) -> mx.array:
    """log(1 + exp(x)), as ``nn.softplus`` (float32: the fast kernels)."""
    return _softplus_fn(x)[0] if x.dtype == mx.float32 else nn.softplus(x)


def gate(y: mx.array, z: mx.array) -> mx.array:
    """y * silu(z) in one pass (float32: the fast kernels)."""
    if y.dtype == z.dtype == mx.float32 and y.shape == z.shape:
        return _gate_fn(y, z)[0]
    return y * nn.silu(z)


# --- causal depthwise convolution with a hand-written backward ----------------------------------

def _conv_forward(x, weight):
    kernel, seq = weight.shape[-1], x.shape[1]
    padded = mx.pad(x, [(0, 0), (kernel - 1, 0), (0, 0)])
    y = padded[:, :seq] * weight[:, 0, 0]
    for j in range(1, kernel):
        y = y + padded[:, j: j + seq] * weight[:, 0, j]
    return y


def _conv_vjp(primals, g, output):
    # autodiff would scatter each of the K shifted slices into a zero tensor of the full size
    x, weight = primals
    kernel, seq = weight.shape[-1], x.shape[1]
    padded = mx.pad(x, [(0, 0), (kernel - 1, 0), (0, 0)])
    g_padded = mx.pad(g, [(0, 0), (0, kernel - 1), (0, 0)])
    dx = g * weight[:, 0, 0] if kernel == 1 else g_padded[:, kernel - 1:] * weight[:, 0, 0]
    for j in range(1, kernel):
        dx = dx + g_padded[:, kernel - 1 - j: kernel - 1 - j + seq] * weight[:, 0, j]
    dw = mx.stack([(g * padded[:, j: j + seq]).sum((0, 1)) for j in range(kernel)], axis=-1)
    return dx, dw[:, None, :]


# y[:, t, c] = sum_j weight[c, 0, j] x[:, t - K + 1 + j, c] (zeros before the start), as
# blocks.mlx.ops.causal_depthwise_conv without the bias
causal_conv = mx.custom_function(_conv_forward)
causal_conv.vjp(_conv_vjp)


# --- the selective scan -------------------------------------------------------------------------

def _steps(x: mx.array) -> list[mx.array]:
    """(S, ...) -> S views (1, ...), in one op."""
    return mx.split(x, x.shape[0], axis=0) if x.shape[0] > 1 else [x]


def _time_major(x: mx.array, shape: tuple[int, ...]) -> mx.array:
    """(batch, S, F) -> (S, *shape): time first, singleton axes where the step broadcasts."""
    return x.transpose(1, 0, 2).reshape(x.shape[1], *shape)


def _scan_forward(u, delta, a_tr, B, C):
    """y (batch, S, E) and, for the backward, per step (each (1, batch, N, E)): the states h_t
    and, for t >= 1, the decays a_t and the factors q_t, s_t of :func:`_scan_step`. ``a_tr`` is
    A transposed, (N, E)."""
    u, delta, a_tr, B, C = _detached(u, delta, a_tr, B, C)
    batch, seq, inner = u.shape
    state = a_tr.shape[0]
    deltas = _steps(_time_major(delta, (batch, 1, inner)))
    drives = _steps(_time_major(delta * u, (batch, 1, inner)))
    Bs = _steps(_time_major(B, (batch, state, 1)))
    Cs = _steps(_time_major(C, (batch, 1, state)))
    shape = (1, batch, state, inner)
    a_mat = mx.broadcast_to(a_tr, shape) + 0.0  # contiguous, as the kernel's arguments must be
    step = _kernel("_scan_step")
    states, saved, ys = [], [], []
    h = None
    for t in range(seq):
        b = Bs[t] * drives[t]  # Δ_t u_t B_t: (1, batch, N, E)
        if h is None:
            h = b
        else:  # Δ_t copied along N (a copy is cheaper than a broadcast product)
            a, h, q, s = step(mx.broadcast_to(deltas[t], shape) + 0.0, h, b, a_mat)
            saved.append((a, q, s))
        states.append(h)
        ys.append(Cs[t] @ h)  # Σ_n C_t[n] h_t[n, :]: (1, batch, 1, E)
    y = mx.concatenate(ys, axis=0).reshape(seq, batch, inner).transpose(1, 0, 2)
    return y, states, saved


def _scan_vjp(primals, cotangents, outputs):
    """The reverse (adjoint) scan g_t = a_{t+1} g_{t+1} + C_t dy_t, one step at a time. With
    w_t = g_t a_t h_{t-1} = dL/d(Δ_t A): dΔ_t = Σ_n w A + (Σ_n B_t g_t) u_t = Σ_n g q + ...,
    dA = Σ_{t,b} w Δ_t = Σ_{t,b} g s. Plain ops (a VJP runs uncompiled): per step a rank-1
    update, two products with their sums and three matrix-vector products."""
    u, delta, a_tr, B, C = primals
    dy = cotangents[0]
    _, states, saved = outputs
    batch, seq, inner = u.shape
    state = a_tr.shape[0]
    drives = _steps(_time_major(delta * u, (batch, inner, 1)))
    dys = _steps(_time_major(dy, (batch, 1, inner)))
    dys_col = _steps(_time_major(dy, (batch, inner, 1)))
    Bs = _steps(_time_major(B, (batch, 1, state)))
    Cs = _steps(_time_major(C, (batch, state, 1)))
    g = gs_sum = None
    gBs, gqs, dBs, dCs = [], [], [], []
    for t in range(seq - 1, -1, -1):
        # g_t = a_{t+1} g_{t+1} + C_t dy_t (the outer product as a rank-1 matmul update)
        g = Cs[t] @ dys[t] if g is None else mx.addmm(saved[t][0] * g, Cs[t], dys[t])
        gBs.append(Bs[t] @ g)  # Σ_n B_t[n] g_t[n, :]
        if t == 0:  # h_{-1} = 0: nothing flows into Δ_0 A
            gqs.append(mx.zeros_like(gBs[-1]))
        else:
            _, q, s = saved[t - 1]
            gqs.append((g * q).sum(2, keepdims=True))
            part = (g * s).sum(1, keepdims=True)
            gs_sum = part if gs_sum is None else gs_sum + part
        dBs.append(g @ drives[t])  # Σ_e g_t[n, e] Δ_t[e] u_t[e]
        dCs.append(states[t] @ dys_col[t])  # Σ_e h_t[n, e] dy_t[e]

    def batch_major(parts):  # reversed list of (1, batch, 1 or N, F) -> (batch, S, F)
        return mx.concatenate(parts[::-1], axis=0).reshape(seq, batch, -1).transpose(1, 0, 2)

    gB = batch_major(gBs)
    d_a = mx.zeros_like(a_tr) if gs_sum is None else gs_sum.reshape(state, inner)
    return gB * delta, batch_major(gqs) + gB * u, d_a, batch_major(dBs), batch_major(dCs)


_scan = mx.custom_function(_scan_forward)
_scan.vjp(_scan_vjp)


def selective_scan(u, delta, A, B, C, D=None, chunk: int | None = None) -> mx.array:
    """The selective scan (no initial state): ``u, delta: (batch, seq, E)`` (delta after
    softplus), ``A: (E, N)``, ``B, C: (batch, seq, N)``, ``D: (E,)`` or None ->
    ``(batch, seq, E)``. Float32 runs the step-by-step scan with its hand-written backward;
    other types :func:`selective_scan_reference`. ``chunk`` (the torch scan's chunk length) is
    checked and otherwise has no effect: the result is the same for every chunk."""
    if chunk is not None and int(chunk) <= 0:
        raise ValueError(f"chunk must be a positive integer, got {chunk}")
    if any(x.dtype != mx.float32 for x in (u, delta, A, B, C)):
        return selective_scan_reference(u, delta, A, B, C, D)
    y = _scan(u, delta, A.T, B, C)[0]
    return y if D is None else y + u * D


def selective_scan_reference(u, delta, A, B, C, D=None) -> mx.array:
    """The same recurrence one step at a time with plain ops (MLX autodiff; for tests)."""
    h = mx.zeros((u.shape[0], u.shape[2], A.shape[1]), dtype=u.dtype)
    ys = []
    for t in range(u.shape[1]):
        decay = mx.exp(delta[:, t, :, None] * A)
        h = decay * h + (delta[:, t] * u[:, t])[..., None] * B[:, t, None]
        ys.append((h * C[:, t, None]).sum(-1))
    y = mx.stack(ys, axis=1)
    return y if D is None else y + u * D


@register("mamba", backend="mlx")
class MambaBlock(Block):
    """x + Mamba(LayerNorm(x)) (``mamba_simple.Mamba``'s parameters and initialisation)."""

    torch_name = "mamba"

    def __init__(self, d_model: int, max_len: int, **options):
        super().__init__(d_model, max_len, **options)
        ref = self._reference
        defaults = inspect.signature(type(ref)).parameters
        dt_min, dt_max, dt_floor = (options.get(k, defaults[k].default)
                                    for k in ("dt_min", "dt_max", "dt_init_floor"))
        bias = ref.in_proj.bias is not None
        E, N, R = self.d_inner, self.d_state, self.dt_rank

        self.in_proj = nn.Linear(d_model, 2 * E, bias=bias)
        self.conv1d = DepthwiseConv1d(E, self.d_conv, bias=ref.conv1d.bias is not None)
        self.x_proj = nn.Linear(E, R + 2 * N, bias=False)
        self.dt_proj = linear(R, E)
        self.A_log = mx.repeat(mx.log(mx.arange(1, N + 1, dtype=mx.float32))[None], E, axis=0)
        self.D = mx.ones((E,))
        self.out_proj = nn.Linear(E, d_model, bias=bias)

        self.in_proj.weight = small_init((2 * E, d_model), d_model)
        self.x_proj.weight = small_init((R + 2 * N, E), E)
        self.out_proj.weight = wang_init((d_model, E), d_model, self.num_blocks)
        for lin in (self.in_proj, self.out_proj):
            if bias:
                lin.bias = mx.zeros_like(lin.bias)
        # dt_proj: weight U(±R^-1/2); bias = softplus^-1(dt), dt log-uniform in [dt_min, dt_max]
        self.dt_proj.weight = uniform((E, R), R**-0.5)
        log_lo, log_hi = math.log(dt_min), math.log(dt_max)
        dt = mx.exp(mx.random.uniform(shape=(E,)) * (log_hi - log_lo) + log_lo)
        dt = mx.maximum(dt, dt_floor)
        self.dt_proj.bias = dt + mx.log(-mx.expm1(-dt))

    def mix(self, x: mx.array) -> mx.array:
        xs, z = mx.split(self.in_proj(x), 2, axis=-1)
        xs = causal_conv(xs, self.conv1d.weight)
        if "bias" in self.conv1d:
            xs = xs + self.conv1d.bias
        xs = silu(xs)
        R, N = self.dt_rank, self.d_state
        proj = self.x_proj(xs)
        dt, B, C = proj[..., :R], proj[..., R:R + N], proj[..., R + N:]
        delta = softplus(self.dt_proj(dt))
        A = -mx.exp(self.A_log)
        y = selective_scan(xs, delta, A, B, C, self.D, chunk=self.chunk_size)
        return self.out_proj(gate(y, z))
