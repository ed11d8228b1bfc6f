"""Mamba: a selective state-space block (Gu & Dao 2023, ``mamba_simple.py``).

Per channel d of the inner width and state index n, with u = SiLU(causal_conv(x))::

    Δ_t = softplus(W_Δ (W_x u_t)[:R] + b_Δ);   B_t, C_t = (W_x u_t)[R:R+N], (W_x u_t)[R+N:]
    h_t[d, n] = exp(Δ_t[d] A[d, n]) h_{t-1}[d, n] + Δ_t[d] u_t[d] B_t[n]
    y_t[d]    = Σ_n C_t[n] h_t[d, n] + D[d] u_t[d];   out_t = W_out (y_t ⊙ SiLU(z_t))

with A = -exp(A_log) (S4D-real init A[d, n] = -(n + 1)), D initialised to ones and the bias of
the Δ projection set so softplus(b_Δ) is log-uniform in [dt_min, dt_max].

Two forms of the selective scan, same arguments and result:

- :func:`selective_scan_reference`: the recurrence above, one step at a time, plain autograd.
- :func:`selective_scan`: the fast path the block uses. Mamba-1 decays differ per (d, n), so the
  quadratic "segsum" form of Mamba-2 would cost chunk-length times the state per chunk; instead a
  two-level scan runs the recurrence inside chunks of length L ≈ √S for all chunks at once, then
  carries the state across chunk boundaries (≈ 2√S Python steps instead of S). Only products of
  decays ≤ 1 are formed, so nothing can overflow. A custom autograd function keeps just the
  states h and runs the reverse (adjoint) scan the same way in the backward pass.

The block itself calls :func:`gated_selective_scan`, the scan with softplus before it and the D
skip and the SiLU gate after it; on the CPU in float32 one C kernel does all four in one pass
each way (``blocks/csrc/selective_scan.c``), elsewhere they are torch operators around
:func:`selective_scan`.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from blocks import native
from blocks.base import Block
from blocks.init import small_init_, wang_init_
from blocks.ops import causal_depthwise_conv
from blocks.registry import BlockError, register


def selective_scan_reference(
    u: torch.Tensor,
    delta: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor | None = None,
) -> torch.Tensor:
    """The selective scan as a plain step-by-step loop (autograd does the backward).

    ``u, delta: (batch, seq, d_inner)`` (delta already positive, after softplus),
    ``A: (d_inner, d_state)``, ``B, C: (batch, seq, d_state)``, ``D: (d_inner,)`` or None.
    Returns ``y: (batch, seq, d_inner)``. The state starts at zero.
    """
    batch, seq, d_inner = u.shape
    h = u.new_zeros(batch, d_inner, A.shape[1])
    ys = []
    for t in range(seq):
        decay = torch.exp(delta[:, t, :, None] * A)  # (batch, d_inner, d_state)
        h = decay * h + (delta[:, t] * u[:, t])[:, :, None] * B[:, t, None, :]
        ys.append((h * C[:, t, None, :]).sum(-1))
    y = torch.stack(ys, dim=1)
    return y if D is None else y + u * D


def default_chunk(seq: int) -> int:
    """Chunk length that balances the two loops of the two-level scan: ceil(sqrt(seq))."""
    return max(1, math.isqrt(max(seq - 1, 0)) + 1)


def _to_chunks(x: torch.Tensor, chunk: int) -> torch.Tensor:
    """(batch, seq, F) -> (chunk, num_chunks, batch, F), zero-padded at the end.

    The scan's big (…, d_inner, d_state) tensors are built by broadcasting from these, so they
    come out with the time-in-chunk axis first and every slice the loops touch is contiguous.
    """
    batch, seq, feat = x.shape
    num_chunks = -(-seq // chunk)
    x = F.pad(x, (0, 0, 0, num_chunks * chunk - seq))
    return x.view(batch, num_chunks, chunk, feat).permute(2, 1, 0, 3).contiguous()


def _from_chunks(x: torch.Tensor, seq: int) -> torch.Tensor:
    """Inverse of :func:`_to_chunks`: (chunk, num_chunks, batch, F) -> (batch, seq, F)."""
    chunk, num_chunks, batch, feat = x.shape
    return x.permute(2, 1, 0, 3).reshape(batch, num_chunks * chunk, feat)[:, :seq]


def _linear_scan_(a: torch.Tensor, h: torch.Tensor, reverse: bool) -> None:
    """Two-level scan in place: ``h_t = a_t h_{t-1} + h_t`` (``h_{t+1}`` when ``reverse``) from a
    zero state; ``a, h: (chunk, num_chunks, ...)``, time = chunk index * chunk + first index.

    1. inside every chunk at once, from a zero state (``a`` becomes the running decay product);
    2. a loop over chunks gives the state entering each chunk;
    3. each position adds its chunk's entering state times the decay product up to it.
    Every factor is a product of decays, never a quotient, so nothing can overflow.
    """
    chunk, num_chunks = h.shape[:2]
    steps = range(chunk - 2, -1, -1) if reverse else range(1, chunk)
    for t in steps:
        prev = t + 1 if reverse else t - 1
        h[t].addcmul_(a[t], h[prev])
        a[t].mul_(a[prev])
    edge = 0 if reverse else chunk - 1  # where a chunk hands its state to the next one
    carry = h.new_zeros(h.shape[2:])
    entering = torch.empty_like(h[0])
    for c in range(num_chunks - 1, -1, -1) if reverse else range(num_chunks):
        entering[c] = carry
        carry = torch.addcmul(h[edge, c], a[edge, c], carry)
    h.addcmul_(a, entering.unsqueeze(0))


class _SelectiveScan(torch.autograd.Function):
    """y_t[d] = Σ_n C_t[n] h_t[d, n], h from the selective recurrence (no D skip).

    Works in the chunked layout of :func:`_to_chunks`; saves only the states h for backward.
    """

    @staticmethod
    def forward(ctx, u, delta, A, B, C, chunk):
        seq = u.shape[1]
        u_c, delta_c, B_c, C_c = (_to_chunks(x, chunk) for x in (u, delta, B, C))
        decay = torch.mul(delta_c.unsqueeze(-1), A).exp_()  # (L, nC, batch, d_inner, d_state)
        h = (delta_c * u_c).unsqueeze(-1) * B_c.unsqueeze(-2)
        _linear_scan_(decay, h, reverse=False)
        del decay
        ctx.save_for_backward(A, u_c, delta_c, B_c, C_c, h)
        ctx.seq = seq
        return _from_chunks(torch.einsum("tcbdn,tcbn->tcbd", h, C_c), seq)

    @staticmethod
    def backward(ctx, dy):
        A, u_c, delta_c, B_c, C_c, h = ctx.saved_tensors
        seq, chunk = ctx.seq, h.shape[0]
        dy_c = _to_chunks(dy, chunk)
        # adjoint g_t = dL/dh_t = dy_t C_t + a_{t+1} g_{t+1}: a reverse scan with next decays
        delta = _from_chunks(delta_c, seq)
        delta_next = _to_chunks(F.pad(delta[:, 1:], (0, 0, 0, 1)), chunk)
        decay_next = torch.mul(delta_next.unsqueeze(-1), A).exp_()
        g = dy_c.unsqueeze(-1) * C_c.unsqueeze(-2)
        _linear_scan_(decay_next, g, reverse=True)
        du_delta = delta_c * u_c
        dC = torch.einsum("tcbdn,tcbd->tcbn", h, dy_c)
        # a_t h_{t-1} = h_t - b_t, so dL/d(log a_t) = g_t (h_t - b_t); reuse the decay buffer
        dlog_decay = torch.mul(du_delta.unsqueeze(-1), B_c.unsqueeze(-2), out=decay_next)
        dlog_decay.sub_(h).mul_(g).neg_()
        ddelta = torch.stack([(dlog_decay[t] * A).sum(-1) for t in range(chunk)])
        dA = dlog_decay.mul_(delta_c.unsqueeze(-1)).sum((0, 1, 2))
        del dlog_decay, decay_next
        gB = torch.einsum("tcbdn,tcbn->tcbd", g, B_c)
        dB = torch.einsum("tcbdn,tcbd->tcbn", g, du_delta)
        ddelta += gB * u_c
        du = gB * delta_c
        du, ddelta, dB, dC = (_from_chunks(x, seq) for x in (du, ddelta, dB, dC))
        return du, ddelta, dA, dB, dC, None


def _native_scan_library():
    I64, PTR = native.I64, native.PTR
    return native.library("selective_scan", {"mad_selective_scan_fwd": [I64] * 5 + [PTR] * 7,
                                             "mad_selective_scan_bwd": [I64] * 5 + [PTR] * 12,
                                             "mad_mamba_scan_fwd": [I64] * 7 + [PTR] * 9,
                                             "mad_mamba_scan_bwd": [I64] * 7 + [PTR] * 16})


class _NativeSelectiveScan(torch.autograd.Function):
    """The selective scan (no D skip) by the C kernel ``blocks/csrc/selective_scan.c``.

    Saves only the inputs; the backward recomputes the states one batch element at a time.
    """

    @staticmethod
    def forward(ctx, u, delta, A, B, C):
        lib = _native_scan_library()
        u, delta, B, C = (x.contiguous() for x in (u, delta, B, C))
        At = A.t().contiguous()
        batch, seq, E = u.shape
        N = At.shape[0]
        y = torch.empty_like(u)
        ws = u.new_empty(native.slots(batch), N * E)
        p = native.pointer

        def run(slot, b0, b1):
            lib.mad_selective_scan_fwd(b0, b1, seq, E, N, p(u), p(delta), p(At), p(B), p(C),
                                       p(y), p(ws[slot]))

        native.parallel(batch, run)
        ctx.save_for_backward(u, delta, At, B, C)
        return y

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dy):
        lib = _native_scan_library()
        u, delta, At, B, C = ctx.saved_tensors
        dy = dy.contiguous()
        batch, seq, E = u.shape
        N = At.shape[0]
        du, ddelta = torch.empty_like(u), torch.empty_like(u)
        dB, dC = torch.empty_like(B), torch.empty_like(C)
        threads = native.slots(batch)
        dAt = u.new_zeros(threads, N, E)
        ws = u.new_empty(threads, (2 * seq + 2) * N * E + 2 * E)
        p = native.pointer

        def run(slot, b0, b1):
            lib.mad_selective_scan_bwd(b0, b1, seq, E, N, p(u), p(delta), p(At), p(B), p(C),
                                       p(dy), p(du), p(ddelta), p(dAt[slot]), p(dB), p(dC),
                                       p(ws[slot]))

        native.parallel(batch, run)
        return du, ddelta, dAt.sum(0).t(), dB, dC


def _rows(x: torch.Tensor) -> torch.Tensor:
    """x (batch, seq, F) as the fused kernel reads it: unit last stride and evenly spaced rows
    (a column slice of a contiguous tensor qualifies as it is), else a contiguous copy."""
    if x.stride(-1) == 1 and x.stride(0) == x.shape[1] * x.stride(1):
        return x
    return x.contiguous()


class _NativeGatedScan(torch.autograd.Function):
    """(selective scan of u with delta = softplus(draw), plus D u) times SiLU(z), by the fused C
    kernel ``mad_mamba_scan_*``: softplus, the D skip and the gate happen inside the scan's pass.
    B and C may be column slices of x_proj's output and z of in_proj's (read in place). Saves
    only the inputs, and writes only the output: at these sizes a pass over (batch, seq,
    d_inner) memory costs more than the arithmetic, so the backward recomputes delta, the
    sigmoids and the pre-gate output along with the states, one batch element at a time.
    """

    @staticmethod
    def forward(ctx, u, draw, A, B, C, D, z):
        lib = _native_scan_library()
        u, draw, D = u.contiguous(), draw.contiguous(), D.contiguous()
        B, C, z = _rows(B), _rows(C), _rows(z)
        if B.stride(1) != C.stride(1):
            B, C = B.contiguous(), C.contiguous()
        At = A.t().contiguous()
        batch, seq, E = u.shape
        N = At.shape[0]
        out = torch.empty_like(u)
        ws = u.new_empty(native.slots(batch), (N + 3) * E)
        p = native.pointer

        def run(slot, b0, b1):
            lib.mad_mamba_scan_fwd(b0, b1, seq, E, N, B.stride(1), z.stride(1), p(u), p(draw),
                                   p(At), p(B), p(C), p(D), p(z), p(out), p(ws[slot]))

        native.parallel(batch, run)
        ctx.save_for_backward(u, draw, At, B, C, D, z)
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dout):
        lib = _native_scan_library()
        u, draw, At, B, C, D, z = ctx.saved_tensors
        dout = dout.contiguous()
        batch, seq, E = u.shape
        N = At.shape[0]
        du, ddraw, dz = torch.empty_like(u), torch.empty_like(u), torch.empty_like(u)
        dB, dC = u.new_empty(batch, seq, N), u.new_empty(batch, seq, N)
        threads = native.slots(batch)
        dAt, dD = u.new_zeros(threads, N, E), u.new_zeros(threads, E)
        ws = u.new_empty(threads, (2 * seq + 2) * N * E + (3 * seq + 3) * E)
        p = native.pointer

        def run(slot, b0, b1):
            lib.mad_mamba_scan_bwd(b0, b1, seq, E, N, B.stride(1), z.stride(1), p(u), p(draw),
                                   p(At), p(B), p(C), p(D), p(z), p(dout), p(du), p(ddraw),
                                   p(dAt[slot]), p(dB), p(dC), p(dD[slot]), p(dz),
                                   p(ws[slot]))

        native.parallel(batch, run)
        return du, ddraw, dAt.sum(0).t(), dB, dC, dD.sum(0), dz


def gated_selective_scan(
    u: torch.Tensor,
    draw: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor,
    z: torch.Tensor,
    chunk: int | None = None,
    impl: str = "auto",
) -> torch.Tensor:
    """Mamba's scan with its surroundings: ``selective_scan(u, softplus(draw), A, B, C, D) *
    SiLU(z)``. ``impl``: ``"native"`` the fused C kernel (float32 on the CPU, ``d_inner`` a
    multiple of 8), ``"torch"`` torch's softplus, the two-level scan and the gate, ``"auto"``
    the fused kernel where it applies, else softplus and the gate around :func:`selective_scan`
    (its own C kernel where that applies)."""
    E = u.shape[-1]
    why = None if E % 8 == 0 else f"the fused Mamba scan needs d_inner a multiple of 8, got {E}"
    if native.choose(impl, "selective_scan", (u, draw, A, B, C, D, z), _native_scan_library,
                     unsupported=why):
        return _NativeGatedScan.apply(u, draw, A, B, C, D, z)
    inner = "torch" if impl == "torch" else "auto"
    return selective_scan(u, F.softplus(draw), A, B, C, D, chunk=chunk, impl=inner) * F.silu(z)


def native_available() -> bool:
    """Whether the C selective scan is compiled and loaded here (see :mod:`blocks.native`)."""
    return _native_scan_library() is not None


def selective_scan(
    u: torch.Tensor,
    delta: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor | None = None,
    chunk: int | None = None,
    impl: str = "auto",
) -> torch.Tensor:
    """Fast selective scan; same arguments and result as :func:`selective_scan_reference`.

    ``impl``: ``"native"`` the C kernel (float32 on the CPU), ``"torch"`` the two-level scan of
    torch operators, ``"auto"`` the C kernel where it is loaded and applies, else torch.
    ``chunk`` is the torch scan's inner chunk length (default ceil(sqrt(seq))); any sequence
    length works, multiple of the chunk or not.
    """
    if native.choose(impl, "selective_scan", (u, delta, A, B, C), _native_scan_library):
        y = _NativeSelectiveScan.apply(u, delta, A, B, C)
    else:
        seq = u.shape[1]
        chunk = default_chunk(seq) if chunk is None else int(chunk)
        if chunk <= 0:
            raise ValueError(f"chunk must be a positive integer, got {chunk}")
        y = _SelectiveScan.apply(u, delta, A, B, C, chunk)
    return y if D is None else y + u * D


@register("mamba")
class MambaBlock(Block):
    """x + Mamba(LayerNorm(x)); defaults of ``mamba_simple.Mamba`` (d_state 16, d_conv 4, expand 2).

    Parameters: norm d + in_proj 2·d·E (+2E with bias) + conv E·(K+1) (E·K without bias)
    + x_proj E·(R + 2N) + dt_proj R·E + E + A_log E·N + D E + out_proj E·d (+d with bias),
    with E = expand·d, K = d_conv, N = d_state, R = dt_rank (ceil(d/16) when "auto").
    """

    def __init__(
        self,
        d_model: int,
        max_len: int,
        *,
        block_index: int = 0,
        num_blocks: int = 1,
        d_state: int = 16,
        d_conv: int = 4,
        expand: float = 2,
        dt_rank: int | str = "auto",
        dt_min: float = 1e-3,
        dt_max: float = 1e-1,
        dt_init_floor: float = 1e-4,
        conv_bias: bool = True,
        bias: bool = False,
        chunk_size: int | None = None,
    ):
        super().__init__(d_model, max_len, block_index=block_index, num_blocks=num_blocks)
        if not isinstance(d_state, int) or d_state <= 0:
            raise BlockError(f"mamba: d_state must be a positive integer, got {d_state!r}")
        if not isinstance(d_conv, int) or d_conv <= 0:
            raise BlockError(f"mamba: d_conv must be a positive integer, got {d_conv!r}")
        if expand <= 0 or int(expand * d_model) <= 0:
            raise BlockError(f"mamba: expand must be positive, got {expand!r}")
        if dt_rank == "auto":
            dt_rank = math.ceil(d_model / 16)
        if not isinstance(dt_rank, int) or dt_rank <= 0:
            raise BlockError(f"mamba: dt_rank must be 'auto' or a positive int, got {dt_rank!r}")
        if not 0 < dt_min <= dt_max:
            raise BlockError(f"mamba: need 0 < dt_min <= dt_max, got {dt_min}, {dt_max}")
        if chunk_size is not None and (not isinstance(chunk_size, int) or chunk_size <= 0):
            raise BlockError(
                f"mamba: chunk_size must be a positive integer or null, got {chunk_size!r}"
            )
        self.d_state, self.d_conv, self.dt_rank = d_state, d_conv, dt_rank
        self.d_inner = int(expand * d_model)
        self.chunk_size = chunk_size
        E = self.d_inner

        self.in_proj = nn.Linear(d_model, 2 * E, bias=bias)
        # nn.Conv1d holds the weights (mamba_simple names and init); mix() applies them causally
        self.conv1d = nn.Conv1d(E, E, d_conv, groups=E, padding=d_conv - 1, bias=conv_bias)
        self.x_proj = nn.Linear(E, dt_rank + 2 * d_state, bias=False)
        self.dt_proj = nn.Linear(dt_rank, E, bias=True)
        self.A_log = nn.Parameter(torch.log(torch.arange(1, d_state + 1, dtype=torch.float32))
                                  .repeat(E, 1))
        self.D = nn.Parameter(torch.ones(E))
        self.out_proj = nn.Linear(E, d_model, bias=bias)

        small_init_(self.in_proj.weight, d_model)
        small_init_(self.x_proj.weight, E)
        wang_init_(self.out_proj.weight, d_model, num_blocks)
        for lin in (self.in_proj, self.out_proj):
            if lin.bias is not None:
                nn.init.zeros_(lin.bias)
        # mamba_simple: dt_proj weight U(-R^-1/2, R^-1/2); bias = softplus^-1(dt), dt log-uniform
        nn.init.uniform_(self.dt_proj.weight, -(dt_rank**-0.5), dt_rank**-0.5)
        dt = torch.exp(torch.rand(E) * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min))
        dt = dt.clamp(min=dt_init_floor)
        with torch.no_grad():
            self.dt_proj.bias.copy_(dt + torch.log(-torch.expm1(-dt)))

    def mix(self, x: torch.Tensor) -> torch.Tensor:
        xs, z = self.in_proj(x).chunk(2, dim=-1)
        xs = causal_depthwise_conv(xs, self.conv1d.weight, self.conv1d.bias,
                                   activation="silu")
        dt, B, C = self.x_proj(xs).split([self.dt_rank, self.d_state, self.d_state], dim=-1)
        A = -torch.exp(self.A_log)
        y = gated_selective_scan(xs, self.dt_proj(dt), A, B, C, self.D, z, chunk=self.chunk_size)
        return self.out_proj(y)

    def state_size(self, seq_len: int) -> int:
        """SSM state d_inner·d_state plus the conv window (d_conv - 1)·d_inner."""
        return self.d_inner * self.d_state + (self.d_conv - 1) * self.d_inner
