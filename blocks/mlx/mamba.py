"""MLX twin of :mod:`blocks.mamba`: the selective state-space block (Gu & Dao 2023).

Per inner channel d and state index n, with u = SiLU(causal_conv(x))::

    Δ_t = softplus(W_Δ (W_x u_t)[:R] + b_Δ);   B_t, C_t = (W_x u_t)[R:R+N], (W_x u_t)[R+N:]
    h_t[d, n] = exp(Δ_t[d] A[d, n]) h_{t-1}[d, n] + Δ_t[d] u_t[d] B_t[n]
    y_t[d]    = Σ_n C_t[n] h_t[d, n] + D[d] u_t[d];   out_t = W_out (y_t ⊙ SiLU(z_t))

A = -exp(A_log) (S4D-real init A[d, n] = -(n + 1)); softplus(b_Δ) starts log-uniform in
[dt_min, dt_max]. The scan is a two-level one (chunks of ≈ √S steps, all chunks at once, then
the state carried across chunk boundaries) written functionally; MLX's autodiff runs it
backwards.
"""

from __future__ import annotations

import inspect
import math

import mlx.core as mx
import mlx.nn as nn

from blocks.mamba import default_chunk
from blocks.mlx.base import Block, linear, small_init, uniform, wang_init
from blocks.mlx.short_conv import DepthwiseConv1d
from blocks.registry import register


def _linear_scan(a: mx.array, b: mx.array) -> mx.array:
    """h_t = a_t h_{t-1} + b_t from h_{-1} = 0 along axis 0 of ``a, b: (L, nC, ...)``, time =
    chunk index * L + first index.

    1. inside every chunk at once from a zero state, keeping the running decay products P;
    2. a loop over chunks gives the state entering each chunk;
    3. each position adds its chunk's entering state times P up to it.
    Only products of decays (never quotients) are formed, so nothing can overflow.
    """
    hs, ps = [b[0]], [a[0]]
    for t in range(1, a.shape[0]):
        hs.append(a[t] * hs[-1] + b[t])
        ps.append(a[t] * ps[-1])
    carry = mx.zeros(b.shape[2:], dtype=b.dtype)
    entering = []
    for c in range(a.shape[1]):
        entering.append(carry)
        carry = hs[-1][c] + ps[-1][c] * carry
    return mx.stack(hs) + mx.stack(ps) * mx.stack(entering)[None]


def selective_scan(u, delta, A, B, C, D=None, chunk: int | None = None) -> mx.array:
    """The selective scan (no initial state): ``u, delta: (batch, seq, E)`` (delta after
    softplus), ``A: (E, N)``, ``B, C: (batch, seq, N)``, ``D: (E,)`` or None ->
    ``(batch, seq, E)``. ``chunk`` is the inner chunk length (default ceil(sqrt(seq)))."""
    batch, seq, _ = u.shape
    chunk = default_chunk(seq) if chunk is None else int(chunk)
    if chunk <= 0:
        raise ValueError(f"chunk must be a positive integer, got {chunk}")
    chunk = min(chunk, seq)
    num_chunks = -(-seq // chunk)
    pad = num_chunks * chunk - seq

    def to_chunks(x):  # (batch, seq, F) -> (L, nC, batch, F), zeros at the end (Δ = 0: a = 1)
        x = mx.pad(x, [(0, 0), (0, pad), (0, 0)])
        return x.reshape(batch, num_chunks, chunk, x.shape[-1]).transpose(2, 1, 0, 3)

    u_c, d_c, B_c, C_c = (to_chunks(x) for x in (u, delta, B, C))
    decay = mx.exp(d_c[..., None] * A)  # (L, nC, batch, E, N)
    drive = (d_c * u_c)[..., None] * B_c[..., None, :]
    h = _linear_scan(decay, drive)
    y = (h * C_c[..., None, :]).sum(-1)  # (L, nC, batch, E)
    y = y.transpose(2, 1, 0, 3).reshape(batch, num_chunks * chunk, -1)[:, :seq]
    return y if D is None else y + u * D


def selective_scan_reference(u, delta, A, B, C, D=None) -> mx.array:
    """The same recurrence one step at a time (for tests)."""
    h = mx.zeros((u.shape[0], u.shape[2], A.shape[1]))
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
        xs = nn.silu(self.conv1d(xs))
        R, N = self.dt_rank, self.d_state
        proj = self.x_proj(xs)
        dt, B, C = proj[..., :R], proj[..., R:R + N], proj[..., R + N:]
        delta = nn.softplus(self.dt_proj(dt))
        A = -mx.exp(self.A_log)
        y = selective_scan(xs, delta, A, B, C, self.D, chunk=self.chunk_size)
        return self.out_proj(y * nn.silu(z))
