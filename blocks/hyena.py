"""Hyena (Poli et al. 2023) and multi-head Hyena (MAD, Poli et al. 2024) as residual blocks.

Both follow mad-lab's layers (``mad/model/layers/hyena.py``) and their YAML defaults. With u the
normed input, D = ``inner_factor * d_model`` and N = ``order``::

    x_0, ..., x_{N-1}, v = split(shortconv_3(tile(W_in u)))     N + 1 projections of width D
    v <- h_o * (v * x_{N-1-o}) + b_o * (v * x_{N-1-o})            o = 0 ... N-2, causal long conv
    y = W_out (v * x_0)

``tile`` repeats the in-projection ``proj_groups`` times (mad-lab's tied projection groups: W_in
has (N+1) D / proj_groups outputs). The long filters h_o are implicit (safari's HyenaFilter): a
small FFN with sine activations over positional features of t, times an exponential decay
window; the ``b_o`` are the filter bias ("D" term). The long convolution runs as an FFT with both
signals zero-padded to at least 2S - 1, so it is a causal linear convolution, not a circular one.

Multi-head Hyena (order 2) splits q, v, k (mad-lab's x1, x2, v) into heads of ``head_dim``
channels and convolves the per-head outer product k v^T with one filter per head, shared by the
head's head_dim^2 entries::

    y_t = sum_{s<=t} h[t-s] (q_t . k_s) v_s + b (q_t . k_t) v_t       per head

i.e. linear attention whose decay is a learned long filter; its state grows with head_dim.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from blocks.base import Block
from blocks.init import small_init_, wang_init_
from blocks.ops import tiled_causal_conv
from blocks.registry import BlockError, register

# safari / mad-lab ExponentialModulation defaults: channel c of the filter decays to `target`
# at relative time (fast ... slow) in [0.3, 1.5] of the maximum length.
DECAY_FAST_PCT, DECAY_SLOW_PCT, DECAY_TARGET = 0.3, 1.5, 1e-2


# fft_causal_conv multiplies by the Toeplitz matrix instead of going through the FFT up to this
# many steps, where it was measured faster (forward + backward, one thread, batch 64 x 256
# channels, both forms with their own backward: 8.7 against 17.1 ms at 48 steps, 14.0 / 15.3
# at 64, 29.5 / 23.9 at 96, 48.7 / 26.1 at 128).
TOEPLITZ_MAX_SEQ = 64


def fft_causal_conv(u: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """y[..., t] = sum_{s<=t} k[..., t-s] u[..., s], via FFT with zero-padding to ``fft_size(S)``.

    ``u: (..., S)``; ``k`` broadcasts against ``u`` and has length S on the last axis. For a
    per-channel filter ``k: (C, S)`` and ``u: (B, C, S)`` up to ``TOEPLITZ_MAX_SEQ`` steps it is
    one batched product with each channel's causal Toeplitz matrix instead (the same sum).
    """
    seq_len = u.shape[-1]
    if (seq_len <= TOEPLITZ_MAX_SEQ and k.dim() == 2 and u.dim() == 3
            and u.shape[1] == k.shape[0] and k.shape[1] == seq_len):
        return _ToeplitzCausalConv.apply(u, k)
    return _FFTCausalConv.apply(u, k)


class _ToeplitzCausalConv(torch.autograd.Function):
    """The Toeplitz form of :func:`fft_causal_conv` for ``u: (B, C, S)``, ``k: (C, S)``.

    T[c, t, s] = k[c, t - s] (s <= t, else 0); per channel ``y = u T^T``, ``du = dy T`` and
    dT = dy^T u (the batch summed by the product), whose diagonal t - s = j sums to dk[c, j].
    The diagonals are read through a strided view of dT laid out in a zero-padded buffer of
    2 S^2 per channel: entry (j, m) of the view, at offset j S + m (S + 1), is dT[c, j + m, m]
    while j + m < S and padding beyond. Autograd's backward of the gather that builds T would
    scatter-add S^2 entries per channel instead.
    """

    @staticmethod
    def forward(ctx, u, k):
        toeplitz = _causal_toeplitz(k)
        ctx.save_for_backward(u, toeplitz)
        return torch.matmul(u.transpose(0, 1), toeplitz.transpose(1, 2)).transpose(0, 1)

    @staticmethod
    def backward(ctx, dy):
        u, toeplitz = ctx.saved_tensors
        channels, seq_len = toeplitz.shape[0], toeplitz.shape[-1]
        dy_c = dy.transpose(0, 1)  # (C, B, t)
        du = dk = None
        if ctx.needs_input_grad[0]:
            du = torch.matmul(dy_c, toeplitz).transpose(0, 1)
        if ctx.needs_input_grad[1]:
            flat = dy.new_zeros(channels, 2 * seq_len * seq_len)
            d_toeplitz = flat[:, : seq_len * seq_len].view(channels, seq_len, seq_len)
            torch.matmul(dy_c.transpose(1, 2), u.transpose(0, 1), out=d_toeplitz)
            diagonals = flat.as_strided(
                (channels, seq_len, seq_len), (2 * seq_len * seq_len, seq_len, seq_len + 1)
            )
            dk = diagonals.sum(-1)
        return du, dk


# The FFT path runs over the leading (batch) axis in chunks whose spectrum is about this many
# bytes, so each chunk's rfft, product and irfft stay in cache: at Hyena's sizes in the MAD
# protocol (batch 64 x 256 channels x 256 steps, a 34 MB spectrum) one pass over the whole
# batch was memory-bound. Chunks of 0.5-4 MB ran alike in a micro-benchmark (one thread, on a
# loaded machine: forward 5-8x, backward 4-6x faster than one pass); on a quiet machine the
# training step of (hyena swiglu)*2 at sequence 256 ran 1.55x faster (README, "The panel").
FFT_CHUNK_BYTES = 2 << 20


def fft_size(seq_len: int) -> int:
    """The FFT length for a causal convolution of ``seq_len`` steps: the smallest 2^a 3^b 5^c of
    at least 2 seq_len - 1, where nothing wraps around (the longest lag is seq_len - 1). 2S itself
    can be a poor FFT length: in-context recall's 127 positions made it 254 = 2 x 127, a prime
    factor pocketfft handles far more slowly than 256."""
    n = max(1, 2 * seq_len - 1)
    while True:
        m = n
        for p in (2, 3, 5):
            while m % p == 0:
                m //= p
        if m == 1:
            return n
        n += 1


class _FFTCausalConv(torch.autograd.Function):
    """The FFT form of :func:`fft_causal_conv`, with a backward that stays in the frequency domain.

    With n = ``fft_size(S)`` (at least 2S - 1), U = rfft(u, n), K = rfft(k, n) and
    G = rfft(dy, n) (dy zero-padded too)::

        y  = irfft(U K)[:S]
        du = irfft(G conj(K))[:S]      du[s] = sum_{t>=s} k[t-s] dy[t]
        dk = irfft(G conj(U))[:S]      dk[j] = sum_t dy[t] u[t-j], summed over broadcast axes

    Each product's circular wrap-around lands on the zero padding, so these are the linear
    correlations. Autograd's own backward of rfft goes through full complex FFTs of the padded
    length; this one takes one rfft of dy and one irfft per gradient, and dk's broadcast sum is
    taken on the spectrum, before its irfft. Where k is broadcast along u's leading axis (one
    filter for the whole batch) both directions run over that axis in chunks of about
    ``FFT_CHUNK_BYTES`` of spectrum; the backward recomputes a chunk's U rather than keeping the
    whole batch's spectrum from the forward.
    """

    @staticmethod
    def forward(ctx, u, k):
        seq_len = u.shape[-1]
        n = fft_size(seq_len)
        k_f = torch.fft.rfft(k, n=n)
        ctx.save_for_backward(u, k_f)
        ctx.u_shape = u.shape
        ctx.chunks = _chunks(u, k)

        def conv(x):
            return torch.fft.irfft(torch.fft.rfft(x, n=n) * k_f, n=n)[..., :seq_len]

        if len(ctx.chunks) == 1:
            return conv(u)  # no copy into an output buffer
        out = u.new_empty(torch.broadcast_shapes(u.shape, k.shape))
        for rows in ctx.chunks:
            out[rows] = conv(u[rows])
        return out

    @staticmethod
    def backward(ctx, dy):
        u, k_f = ctx.saved_tensors
        seq_len = dy.shape[-1]
        n = fft_size(seq_len)
        want_u, want_k = ctx.needs_input_grad[:2]
        k_conj = k_f.conj().resolve_conj()
        du = dy.new_empty(ctx.u_shape) if want_u else None
        dk_f = None
        for rows in ctx.chunks:
            dy_f = torch.fft.rfft(dy[rows], n=n)
            if want_u:
                du[rows] = _sum_to(torch.fft.irfft(dy_f * k_conj, n=n)[..., :seq_len],
                                   du[rows].shape)
            if want_k:
                part = _sum_to(dy_f * torch.fft.rfft(u[rows], n=n).conj(), k_f.shape)
                dk_f = part if dk_f is None else dk_f + part
        dk = torch.fft.irfft(dk_f, n=n)[..., :seq_len] if want_k else None  # dk_f has k_f's shape
        return du, dk


def gated_causal_conv(p: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """Order-2 Hyena's gated long convolution: ``x0 * fft_causal_conv(v * x1, k)``.

    ``p: (B, 3 C, S)`` holds x0, x1, v (each ``(B, C, S)``) along its channels, ``k: (C, S)``.
    Where p is contiguous and the sequence is longer than ``TOEPLITZ_MAX_SEQ`` the gates are
    fused into the FFT path's batch chunks (:class:`_GatedFFTCausalConv`): neither product is
    materialised for the whole batch, v * x1 is written straight into a zero-padded buffer (no
    padding copy for the FFT), and the gradient of p is written in place of autograd's split and
    concatenation.
    """
    seq_len = p.shape[-1]
    if seq_len > TOEPLITZ_MAX_SEQ and p.dim() == 3 and k.dim() == 2 and p.is_contiguous():
        return _GatedFFTCausalConv.apply(p, k)
    x0, x1, v = p.split(k.shape[0], dim=1)
    return fft_causal_conv(v * x1, k) * x0


class _GatedFFTCausalConv(torch.autograd.Function):
    """:func:`gated_causal_conv` over the batch in chunks of about ``FFT_CHUNK_BYTES`` of spectrum.

    Per chunk, with u = v * x1 written into the head of a buffer of ``fft_size(S)`` steps whose
    tail stays zero, U = rfft(u), K = rfft(k), c = irfft(U K)[:S] and y = x0 * c. Backward,
    with g = dy * x0 and G = rfft(g) from the same kind of padded buffer::

        dx0 = dy * c        dv = irfft(G conj(K))[:S] * x1        dx1 = irfft(G conj(K))[:S] * v
        dk  = irfft(sum over the batch of G conj(U))[:S]

    The forward keeps c for dx0; U is recomputed per chunk.
    """

    @staticmethod
    def forward(ctx, p, k):
        B, S = p.shape[0], p.shape[-1]
        C = k.shape[0]
        x0, x1, v = p.split(C, dim=1)
        n = fft_size(S)
        k_f = torch.fft.rfft(k, n=n)
        rows = min(B, _chunk_rows(C, n, p.element_size()))
        buf = p.new_zeros(rows, C, n)
        out = p.new_empty(B, C, S)
        conv = p.new_empty(B, C, S)
        for r0 in range(0, B, rows):
            r = slice(r0, min(r0 + rows, B))
            head = buf[: r.stop - r.start]
            torch.mul(v[r], x1[r], out=head[..., :S])
            conv[r] = torch.fft.irfft(torch.fft.rfft(head, n=n) * k_f, n=n)[..., :S]
            torch.mul(conv[r], x0[r], out=out[r])
        ctx.save_for_backward(p, k_f, conv)
        ctx.rows = rows
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dy):
        p, k_f, conv = ctx.saved_tensors
        B, S = p.shape[0], p.shape[-1]
        C = k_f.shape[0]
        x0, x1, v = p.split(C, dim=1)
        n = fft_size(S)
        rows = ctx.rows
        want_p, want_k = ctx.needs_input_grad[:2]
        k_conj = k_f.conj().resolve_conj()
        dp = torch.empty_like(p) if want_p else None
        dx0, dx1, dv = dp.split(C, dim=1) if want_p else (None, None, None)
        dk_f = None
        g_buf = p.new_zeros(rows, C, n)
        u_buf = p.new_zeros(rows, C, n) if want_k else None
        for r0 in range(0, B, rows):
            r = slice(r0, min(r0 + rows, B))
            m = r.stop - r.start
            g_head = g_buf[:m]
            torch.mul(dy[r], x0[r], out=g_head[..., :S])
            g_f = torch.fft.rfft(g_head, n=n)
            if want_p:
                torch.mul(dy[r], conv[r], out=dx0[r])
                du = torch.fft.irfft(g_f * k_conj, n=n)[..., :S]
                torch.mul(du, x1[r], out=dv[r])
                torch.mul(du, v[r], out=dx1[r])
            if want_k:
                u_head = u_buf[:m]
                torch.mul(v[r], x1[r], out=u_head[..., :S])
                part = (g_f * torch.fft.rfft(u_head, n=n).conj()).sum(0)
                dk_f = part if dk_f is None else dk_f + part
        dk = torch.fft.irfft(dk_f, n=n)[..., :S] if want_k else None
        return dp, dk


def _chunk_rows(channels: int, n: int, element_size: int) -> int:
    """Batch rows per FFT chunk: about ``FFT_CHUNK_BYTES`` of spectrum (``channels`` x (n/2 + 1)
    complex values per row), at least one."""
    per_row = channels * (n // 2 + 1) * 2 * element_size
    return max(1, FFT_CHUNK_BYTES // max(1, per_row))


def _chunks(u: torch.Tensor, k: torch.Tensor) -> list:
    """Index slices of the FFT path's chunks: one (everything) unless k is broadcast along u's
    leading axis and the output has that axis (a chunk's gradient of k is then a partial sum),
    else slices of that axis holding about ``FFT_CHUNK_BYTES`` of the output's spectrum."""
    everything = [(...,)]
    if u.dim() < 2 or k.dim() > u.dim() or (k.dim() == u.dim() and k.shape[0] != 1):
        return everything
    out_shape = torch.broadcast_shapes(u.shape, k.shape)
    rows = _chunk_rows(math.prod(out_shape[1:-1]), fft_size(out_shape[-1]), u.element_size())
    if rows >= u.shape[0]:
        return everything
    return [slice(i, i + rows) for i in range(0, u.shape[0], rows)]


def _causal_toeplitz(k: torch.Tensor) -> torch.Tensor:
    """``(C, S) -> (C, S, S)``: T[c, t, s] = k[c, t - s] for s <= t, else 0."""
    seq_len = k.shape[-1]
    pos = torch.arange(seq_len, device=k.device)
    lag = pos[:, None] - pos[None, :]
    return k[:, lag.clamp(min=0)] * (lag >= 0)


def _sum_to(x: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    """``x`` summed over the axes it was broadcast along, down to ``shape`` (leading axes too)."""
    if x.shape == shape:
        return x
    extra = x.dim() - len(shape)
    if extra:
        x = x.sum(tuple(range(extra)))
    axes = tuple(i for i, size in enumerate(shape) if size == 1 and x.shape[i] != 1)
    return x.sum(axes, keepdim=True) if axes else x


def heads_long_conv_fft(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, h: torch.Tensor, bias: torch.Tensor | None
) -> torch.Tensor:
    """Multi-head Hyena's long convolution of k v^T, read out by q (mad-lab's form).

    ``q, k, v: (B, H, hd, S)``, ``h: (H, S)``, ``bias: (H,)`` or None; returns ``(B, H, hd, S)``.
    Memory ~ B H hd^2 S: the per-head outer products are materialised.
    """
    kv = k.unsqueeze(3) * v.unsqueeze(2)  # (B, H, hd_k, hd_v, S)
    y = fft_causal_conv(kv, h[:, None, None, :])
    if bias is not None:
        y = y + bias[:, None, None, None] * kv
    return (q.unsqueeze(3) * y).sum(2)


def heads_long_conv_quadratic(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, h: torch.Tensor, bias: torch.Tensor | None
) -> torch.Tensor:
    """The same operator as :func:`heads_long_conv_fft`, as attention with a Toeplitz mask.

    scores[t, s] = (q_t . k_s) T[t, s] with T[t, s] = h[t - s] (s <= t) + b [s == t].
    Memory ~ B H S^2; cheaper than the FFT form when S is below about 2 hd^2.
    """
    seq_len = q.shape[-1]
    toeplitz = _causal_toeplitz(h)  # (H, S, S)
    if bias is not None:
        toeplitz = toeplitz + bias[:, None, None] * torch.eye(seq_len, device=q.device)
    scores = torch.einsum("bhdt,bhds->bhts", q, k) * toeplitz
    return torch.einsum("bhts,bhes->bhet", scores, v)


class ImplicitFilter(nn.Module):
    """Hyena's implicit long filter (safari's HyenaFilter, non-nested): ``forward(S) -> (C, S)``.

    Positional features z_t = [t/(L-1), cos(f_b w_t), -sin(f_b w_t)] with w_t = 2 pi t / L,
    L = max_len and ``(emb_dim - 1) / 2`` bands f_b = linspace(1e-4, bands - 1); an FFN
    Linear(emb_dim, width) -> sin -> [Linear(width, width) -> sin] * depth -> Linear(width, C, no
    bias), every sine sharing one trainable frequency vector (init ``w``); then the window
    exp(-t/(L-1) |delta_c|) with delta_c = linspace(ln(target)/1.5, ln(target)/0.3) over channels.
    """

    def __init__(
        self,
        channels: int,
        max_len: int,
        *,
        width: int,
        emb_dim: int = 3,
        depth: int = 2,
        w: float = 1.0,
        modulate: bool = True,
    ):
        super().__init__()
        self.modulate = modulate
        t_unit = torch.linspace(0.0, 1.0, max_len, dtype=torch.float64)
        bands = (emb_dim - 1) // 2
        freqs = torch.linspace(1e-4, bands - 1, bands, dtype=torch.float64)
        w_t = 2 * math.pi * torch.arange(max_len, dtype=torch.float64) / max_len
        phase = w_t[:, None] * freqs
        z = torch.cat([t_unit[:, None], phase.cos(), -phase.sin()], dim=-1)
        self.register_buffer("z", z.float(), persistent=False)  # (L, emb_dim)
        self.register_buffer("t", t_unit[:, None].float(), persistent=False)  # (L, 1)
        max_decay = math.log(DECAY_TARGET) / DECAY_FAST_PCT
        min_decay = math.log(DECAY_TARGET) / DECAY_SLOW_PCT
        deltas = torch.linspace(min_decay, max_decay, channels).abs()
        self.register_buffer("deltas", deltas, persistent=False)  # (C,)

        self.inp = nn.Linear(emb_dim, width)
        self.hidden = nn.ModuleList(nn.Linear(width, width) for _ in range(depth))
        self.out = nn.Linear(width, channels, bias=False)
        self.freq = nn.Parameter(torch.full((width,), float(w)))
        for lin in (self.inp, *self.hidden):  # mad-lab zeroes every Linear bias at init
            nn.init.zeros_(lin.bias)

    def forward(self, seq_len: int) -> torch.Tensor:
        a = torch.sin(self.freq * self.inp(self.z[:seq_len]))
        for lin in self.hidden:
            a = torch.sin(self.freq * lin(a))
        filt = self.out(a)  # (S, C)
        if self.modulate:
            filt = filt * torch.exp(-self.t[:seq_len] * self.deltas)
        return filt.t()


def _check_int(block: str, name: str, value, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise BlockError(f"{block}: {name} must be an integer >= {minimum}, got {value!r}")


class _HyenaBase(Block):
    """In-projection (tied groups), short causal depthwise conv, implicit filter, out-projection."""

    _name = "hyena"

    def __init__(
        self,
        d_model: int,
        max_len: int,
        *,
        block_index: int,
        num_blocks: int,
        num_projections: int,
        inner_factor: int,
        proj_groups: int,
        short_filter_order: int,
        filter_channels: int,
        filter_order: int,
        emb_dim: int,
        filter_depth: int,
        filter_bias: bool,
        modulate: bool,
    ):
        super().__init__(d_model, max_len, block_index=block_index, num_blocks=num_blocks)
        name = self._name
        _check_int(name, "inner_factor", inner_factor, 1)
        _check_int(name, "proj_groups", proj_groups, 1)
        _check_int(name, "short_filter_order", short_filter_order, 1)
        _check_int(name, "filter_order", filter_order, 1)
        _check_int(name, "filter_depth", filter_depth, 0)
        _check_int(name, "emb_dim", emb_dim, 3)
        if emb_dim % 2 == 0:
            raise BlockError(f"{name}: emb_dim must be odd (time + cos/sin pairs), not {emb_dim}")
        if not isinstance(filter_bias, bool) or not isinstance(modulate, bool):
            raise BlockError(f"{name}: filter_bias and modulate must be true or false")
        self.inner = inner_factor * d_model
        width = num_projections * self.inner
        if width % proj_groups:
            raise BlockError(
                f"{name}: {num_projections} * inner width {self.inner} = {width} is not divisible "
                f"by proj_groups {proj_groups}"
            )
        self.proj_groups, self.short_filter_order = proj_groups, short_filter_order
        self.in_proj = nn.Linear(d_model, width // proj_groups)
        self.short_filter = nn.Conv1d(width, width, short_filter_order, groups=width)
        self.filter = ImplicitFilter(
            filter_channels, max_len, width=filter_order, emb_dim=emb_dim, depth=filter_depth,
            modulate=modulate,
        )
        self.filter_bias = nn.Parameter(torch.randn(filter_channels)) if filter_bias else None
        self.out_proj = nn.Linear(self.inner, d_model)
        small_init_(self.in_proj.weight, d_model)
        wang_init_(self.out_proj.weight, self.inner, num_blocks)
        nn.init.zeros_(self.in_proj.bias)
        nn.init.zeros_(self.out_proj.bias)

    def _projections(self, u: torch.Tensor) -> torch.Tensor:
        """(B, S, d_model) -> (B, num_projections * inner, S) after the short causal conv."""
        # the in-projection's output tiled proj_groups times through the short causal conv,
        # written channel-major for the long convolutions (blocks.ops' C kernel: no copy of the
        # tiles, no transpose in memory, no general nn.Conv1d backward)
        return tiled_causal_conv(self.in_proj(u), self.short_filter.weight, self.short_filter.bias)

    def _short_conv_state(self, num_projections: int) -> int:
        return (self.short_filter_order - 1) * num_projections * self.inner


@register("hyena")
class HyenaBlock(_HyenaBase):
    """x + Hyena(LayerNorm(x)): order-N gated long convolutions with implicit filters.

    Defaults are mad-lab's ``configs/layers/hyena.yml``: order 2, inner_factor 4, proj_groups 4,
    short filter 3, filter FFN width 4 (``filter_cfg.order``), emb_dim 3, 2 hidden layers,
    filter bias on, modulation on.
    """

    _name = "hyena"

    def __init__(
        self,
        d_model: int,
        max_len: int,
        *,
        block_index: int = 0,
        num_blocks: int = 1,
        order: int = 2,
        inner_factor: int = 4,
        proj_groups: int = 4,
        short_filter_order: int = 3,
        filter_order: int = 4,
        emb_dim: int = 3,
        filter_depth: int = 2,
        filter_bias: bool = True,
        modulate: bool = True,
    ):
        _check_int("hyena", "order", order, 2)
        _check_int("hyena", "inner_factor", inner_factor, 1)
        super().__init__(
            d_model, max_len, block_index=block_index, num_blocks=num_blocks,
            num_projections=order + 1, inner_factor=inner_factor, proj_groups=proj_groups,
            short_filter_order=short_filter_order,
            filter_channels=(order - 1) * inner_factor * d_model, filter_order=filter_order,
            emb_dim=emb_dim, filter_depth=filter_depth, filter_bias=filter_bias, modulate=modulate,
        )
        self.order = order

    def mix(self, x: torch.Tensor) -> torch.Tensor:
        seq_len = x.shape[1]
        projections = self._projections(x)  # (B, (order + 1) D, S): x_0 ... x_{N-1}, v
        h = self.filter(seq_len).view(self.order - 1, self.inner, seq_len)
        if self.filter_bias is not None:
            # b_o v is the convolution with b_o at lag 0: folded into the filter's first tap, so
            # the long convolution computes h_o * v + b_o v in one pass (and one backward)
            bias = self.filter_bias.view(self.order - 1, -1, 1)
            h = torch.cat([h[..., :1] + bias, h[..., 1:]], dim=-1)
        if self.order == 2:  # x_0 * (h_0 * (v x_1)), gates fused into the convolution
            return self.out_proj(gated_causal_conv(projections, h[0]).transpose(1, 2))
        *gates, v = projections.split(self.inner, dim=1)  # each (B, D, S)
        for o, gate in enumerate(reversed(gates[1:])):
            v = fft_causal_conv(v * gate, h[o])
        return self.out_proj((v * gates[0]).transpose(1, 2))

    def state_size(self, seq_len: int) -> int:
        """Floats per sequence at inference: each long conv's input history, (order - 1) * D per
        position over seq_len positions (zoology's Hyena: d_model * seq_len), plus the short
        conv's last ``short_filter_order - 1`` inputs on all (order + 1) * D channels.
        """
        return (self.order - 1) * self.inner * seq_len + self._short_conv_state(self.order + 1)


@register("mh_hyena")
class MultiHeadHyenaBlock(_HyenaBase):
    """x + MultiHeadHyena(LayerNorm(x)): order 2, per-head long conv of k v^T read out by q.

    Defaults are mad-lab's ``configs/layers/mh-hyena.yml``: inner_factor 1, short filter 3,
    filter FFN width 2, emb_dim 3, filter bias on, and ``num_heads: 16``, which mad-lab passes to
    ``fftconv_heads`` as its ``head_dim``: 16 channels per head, d_model / 16 heads (8 at d=128).
    ``proj_groups`` is not set there, so HyenaOperator's default 4 applies.
    """

    _name = "mh_hyena"

    def __init__(
        self,
        d_model: int,
        max_len: int,
        *,
        block_index: int = 0,
        num_blocks: int = 1,
        head_dim: int = 16,
        inner_factor: int = 1,
        proj_groups: int = 4,
        short_filter_order: int = 3,
        filter_order: int = 2,
        emb_dim: int = 3,
        filter_depth: int = 2,
        filter_bias: bool = True,
        modulate: bool = True,
    ):
        _check_int("mh_hyena", "head_dim", head_dim, 1)
        _check_int("mh_hyena", "inner_factor", inner_factor, 1)
        inner = inner_factor * d_model
        if inner % head_dim:
            raise BlockError(
                f"mh_hyena: inner width {inner} (inner_factor * d_model) must be divisible by "
                f"head_dim {head_dim}"
            )
        super().__init__(
            d_model, max_len, block_index=block_index, num_blocks=num_blocks,
            num_projections=3, inner_factor=inner_factor, proj_groups=proj_groups,
            short_filter_order=short_filter_order, filter_channels=inner // head_dim,
            filter_order=filter_order, emb_dim=emb_dim, filter_depth=filter_depth,
            filter_bias=filter_bias, modulate=modulate,
        )
        self.head_dim, self.num_heads = head_dim, inner // head_dim

    def mix(self, x: torch.Tensor) -> torch.Tensor:
        B, seq_len, _ = x.shape
        shape = (B, self.num_heads, self.head_dim, seq_len)
        q, v, k = (p.reshape(shape) for p in self._projections(x).split(self.inner, dim=1))
        h = self.filter(seq_len)  # (H, S)
        if seq_len <= 2 * self.head_dim**2:
            y = heads_long_conv_quadratic(q, k, v, h, self.filter_bias)
        else:
            y = heads_long_conv_fft(q, k, v, h, self.filter_bias)
        return self.out_proj(y.reshape(B, self.inner, seq_len).transpose(1, 2))

    def state_size(self, seq_len: int) -> int:
        """Floats per sequence at inference: the long conv's input history, the per-head outer
        products k v^T (D * head_dim per position) over seq_len positions, plus the short conv's
        last ``short_filter_order - 1`` inputs on the 3 * D projection channels.
        """
        return self.inner * self.head_dim * seq_len + self._short_conv_state(3)
