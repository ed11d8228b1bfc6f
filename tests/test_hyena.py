"""Hyena and multi-head Hyena against slow float64 references built from the papers' equations."""

import math

import pytest
import torch

import blocks
from blocks import hyena
from blocks.hyena import (
    TOEPLITZ_MAX_SEQ,
    fft_causal_conv,
    heads_long_conv_fft,
    heads_long_conv_quadratic,
)

D_MODEL, MAX_LEN = 16, 48


def _build(name, d_model=D_MODEL, **kw):
    torch.manual_seed(torch.seed())  # fresh weights every run
    return blocks.build(name, d_model, MAX_LEN, **kw)


def _direct_causal_conv(u, k):
    """y[..., t] = sum_{s<=t} k[..., t-s] u[..., s], one output position at a time."""
    S = u.shape[-1]
    y = torch.zeros_like(u)
    for t in range(S):
        lags = torch.arange(t, -1, -1)  # t - s for s = 0 ... t
        y[..., t] = (k[..., lags] * u[..., : t + 1]).sum(-1)
    return y


def _heads_loop(q, k, v, h, bias):
    """y_t = sum_{s<=t} h[t-s] (q_t . k_s) v_s + b (q_t . k_t) v_t, per head, by explicit loops."""
    y = torch.zeros_like(v)
    S = q.shape[-1]
    for t in range(S):
        for s in range(t + 1):
            coef = h[:, t - s].clone()
            if bias is not None and s == t:
                coef = coef + bias
            qk = (q[..., t] * k[..., s]).sum(-1, keepdim=True)  # (B, H, 1)
            y[..., t] += coef[None, :, None] * qk * v[..., s]
    return y


@pytest.mark.parametrize("low,high", [(5, 40), (TOEPLITZ_MAX_SEQ + 1, TOEPLITZ_MAX_SEQ + 40)])
def test_fft_causal_conv_matches_direct_sum(low, high):
    # short sequences take the Toeplitz product, longer ones the FFT: the same sum, and the
    # same gradients
    S = int(torch.randint(low, high, ()).item())
    u = torch.randn(2, 6, S, dtype=torch.float64, requires_grad=True)
    k = torch.randn(6, S, dtype=torch.float64, requires_grad=True)
    y, ref = fft_causal_conv(u, k), _direct_causal_conv(u, k)
    torch.testing.assert_close(y, ref)
    dy = torch.randn_like(y)
    for g, g_ref in zip(torch.autograd.grad(y, (u, k), dy), torch.autograd.grad(ref, (u, k), dy)):
        torch.testing.assert_close(g, g_ref)
    # float32 too: the zero-padding to 2S keeps it linear (not circular) at float32 rounding
    torch.testing.assert_close(
        fft_causal_conv(u.float(), k.float()), _direct_causal_conv(u, k).float(),
        rtol=1e-4, atol=1e-4,
    )


@pytest.mark.parametrize("u_shape,k_shape", [((2, 3, 4, 5), (3, 1, 1)), ((3, 2), ()), ((4,), (1,))])
def test_fft_causal_conv_gradients_sum_over_broadcast_axes(u_shape, k_shape):
    # the FFT path's own backward reduces dk over the axes k was broadcast along (multi-head
    # Hyena convolves (B, H, hd, hd, S) with (H, 1, 1, S)); against the direct sum's autograd
    S = int(torch.randint(TOEPLITZ_MAX_SEQ + 1, TOEPLITZ_MAX_SEQ + 30, ()).item())
    u = torch.randn(*u_shape, S, dtype=torch.float64, requires_grad=True)
    k = torch.randn(*k_shape, S, dtype=torch.float64, requires_grad=True)
    y, ref = fft_causal_conv(u, k), _direct_causal_conv(u, k.expand(*u_shape, S))
    torch.testing.assert_close(y, ref)
    dy = torch.randn_like(y)
    got = torch.autograd.grad(y, (u, k), dy)
    want = torch.autograd.grad(ref, (u, k), dy)
    for g, g_ref in zip(got, want):
        assert g.shape == g_ref.shape
        torch.testing.assert_close(g, g_ref)


@pytest.mark.parametrize(
    "u_shape,k_shape",
    [((5, 3), (3,)), ((7, 2, 3, 3), (2, 1, 1)), ((6, 4), (1, 4)), ((4, 3), (4, 3)), ((3,), (2, 3))],
)
@pytest.mark.parametrize("chunk_rows", [1, 2])
def test_fft_causal_conv_in_batch_chunks_matches_direct_sum(monkeypatch, u_shape, k_shape,
                                                            chunk_rows):
    # the FFT path runs over u's leading axis in chunks where k is broadcast along it (its dk is
    # then summed over chunks) and in one pass where it is not (k per row, or k with more axes);
    # a chunk budget of 1 or 2 rows, uneven last chunks included, against the direct sum
    S = int(torch.randint(TOEPLITZ_MAX_SEQ + 1, TOEPLITZ_MAX_SEQ + 30, ()).item())
    spectrum = hyena.fft_size(S) // 2 + 1
    per_row = math.prod(torch.broadcast_shapes(u_shape, k_shape)[1:]) * spectrum * 2 * 8
    monkeypatch.setattr(hyena, "FFT_CHUNK_BYTES", chunk_rows * per_row)
    u = torch.randn(*u_shape, S, dtype=torch.float64, requires_grad=True)
    k = torch.randn(*k_shape, S, dtype=torch.float64, requires_grad=True)
    chunks = hyena._chunks(u, k)
    broadcast_lead = len(k_shape) < len(u_shape) or (
        len(k_shape) == len(u_shape) and k_shape[0] == 1
    )
    assert len(chunks) == (-(-u_shape[0] // chunk_rows) if broadcast_lead else 1)
    out_shape = torch.broadcast_shapes(u.shape, k.shape)
    y = fft_causal_conv(u, k)
    ref = _direct_causal_conv(u.expand(out_shape), k.expand(out_shape))
    torch.testing.assert_close(y, ref)
    dy = torch.randn_like(y)
    want = torch.autograd.grad(ref, (u, k), dy)
    for g, g_ref in zip(torch.autograd.grad(y, (u, k), dy), want):
        assert g.shape == g_ref.shape
        torch.testing.assert_close(g, g_ref)
    # the gradient of u alone (a frozen filter) takes the same chunks
    (du,) = torch.autograd.grad(fft_causal_conv(u, k.detach()), (u,), dy)
    torch.testing.assert_close(du, want[0])


@pytest.mark.parametrize("chunk_rows", [1, 2, 64])
@pytest.mark.parametrize("frozen", ["none", "filter", "input"])
def test_gated_causal_conv_matches_direct_sum(monkeypatch, chunk_rows, frozen):
    # order-2 Hyena's x0 * (k * (v x1)) with the gates fused into the FFT chunks, against the
    # direct sum with the products written out: values and the gradients of p (written in place
    # of split + cat) and k, batch chunks of 1, 2 or all rows (uneven last chunks included)
    B, C = int(torch.randint(3, 6, ()).item()), int(torch.randint(2, 5, ()).item())
    S = int(torch.randint(TOEPLITZ_MAX_SEQ + 1, TOEPLITZ_MAX_SEQ + 30, ()).item())
    monkeypatch.setattr(hyena, "FFT_CHUNK_BYTES",
                        chunk_rows * C * (hyena.fft_size(S) // 2 + 1) * 2 * 8)
    p = torch.randn(B, 3 * C, S, dtype=torch.float64, requires_grad=frozen != "input")
    k = torch.randn(C, S, dtype=torch.float64, requires_grad=frozen != "filter")
    y = hyena.gated_causal_conv(p, k)
    assert type(y.grad_fn).__name__ == "_GatedFFTCausalConvBackward"
    x0, x1, v = p.split(C, dim=1)
    ref = _direct_causal_conv(v * x1, k.expand(B, C, S)) * x0
    torch.testing.assert_close(y, ref)
    dy = torch.randn_like(y)
    leaves = [t for t in (p, k) if t.requires_grad]
    for g, g_ref in zip(torch.autograd.grad(y, leaves, dy), torch.autograd.grad(ref, leaves, dy)):
        torch.testing.assert_close(g, g_ref)


def test_gated_causal_conv_short_or_strided_takes_the_unfused_path():
    C, S = 3, TOEPLITZ_MAX_SEQ + 5
    k = torch.randn(C, S, dtype=torch.float64)
    for p in (torch.randn(2, 3 * C, TOEPLITZ_MAX_SEQ, dtype=torch.float64),  # Toeplitz length
              torch.randn(2, S, 3 * C, dtype=torch.float64).transpose(1, 2)):  # not contiguous
        kk = k[:, : p.shape[-1]]
        y = hyena.gated_causal_conv(p, kk)
        assert type(y.grad_fn).__name__ != "_GatedFFTCausalConvBackward"
        x0, x1, v = p.split(C, dim=1)
        torch.testing.assert_close(y, _direct_causal_conv(v * x1, kk.expand_as(v)) * x0)


@pytest.mark.parametrize("impl", ["native", "torch"])
@pytest.mark.parametrize("groups,kernel,with_bias", [(4, 3, True), (1, 4, False), (3, 5, True)])
def test_tiled_causal_conv_matches_the_direct_sum(impl, groups, kernel, with_bias):
    # Hyena's short filter: the input repeated `groups` times along the channels, a causal
    # depthwise conv, the output channel-major; against the direct sum in float64, with the
    # gradients (the input's summed over the groups that read it); lengths not a multiple of 8
    from blocks.ops import _native_conv_library, tiled_causal_conv

    if impl == "native" and _native_conv_library() is None:
        pytest.skip("native kernels not built here")
    B, Cin = int(torch.randint(1, 4, ()).item()), 8 * int(torch.randint(1, 4, ()).item())
    S = int(torch.randint(1, 40, ()).item())
    x = torch.randn(B, S, Cin, requires_grad=True)
    w = torch.randn(groups * Cin, 1, kernel, requires_grad=True)
    b = torch.randn(groups * Cin, requires_grad=True) if with_bias else None
    y = tiled_causal_conv(x, w, b, impl=impl)
    assert y.shape == (B, groups * Cin, S)
    if impl == "native":
        assert y.is_contiguous()  # written channel-major, not a transposed view
    leaves = [t for t in (x, w, b) if t is not None]
    x64, w64 = x.detach().double().requires_grad_(), w.detach().double().requires_grad_()
    b64 = None if b is None else b.detach().double().requires_grad_()
    tiled = x64.repeat(1, 1, groups)  # (B, S, C)
    ref = torch.zeros(B, groups * Cin, S, dtype=torch.float64)
    for t in range(S):
        for k in range(kernel):
            s = t - kernel + 1 + k
            if s >= 0:
                ref[:, :, t] = ref[:, :, t] + w64[:, 0, k] * tiled[:, s, :]
        if b64 is not None:
            ref[:, :, t] = ref[:, :, t] + b64
    torch.testing.assert_close(y.double(), ref, rtol=1e-5, atol=1e-5)
    dy = torch.randn_like(y)
    leaves64 = [t for t in (x64, w64, b64) if t is not None]
    grads = torch.autograd.grad(y, leaves, dy)
    for g, g_ref in zip(grads, torch.autograd.grad(ref, leaves64, dy.double())):
        torch.testing.assert_close(g.double(), g_ref, rtol=1e-4, atol=1e-4)


def test_tiled_causal_conv_refuses_channels_that_do_not_tile():
    from blocks.ops import tiled_causal_conv

    with pytest.raises(ValueError, match="whole number of tiles"):
        tiled_causal_conv(torch.randn(1, 4, 8), torch.randn(12, 1, 3))
    with pytest.raises(RuntimeError, match="multiple of 8"):
        tiled_causal_conv(torch.randn(1, 4, 6), torch.randn(12, 1, 3), impl="native")


def test_fft_size_is_the_smallest_5_smooth_length_without_wrap_around():
    def smooth(n):
        for p in (2, 3, 5):
            while n % p == 0:
                n //= p
        return n == 1

    for S in [1, 2, 127, *torch.randint(3, 3000, (20,)).tolist()]:
        n = hyena.fft_size(S)
        assert n >= 2 * S - 1 and smooth(n)
        assert not any(smooth(m) for m in range(2 * S - 1, n))
    assert hyena.fft_size(127) == 256  # in-context recall's length: not 254 = 2 x 127


def test_fft_causal_conv_is_not_circular():
    S = 16
    u = torch.zeros(1, S, dtype=torch.float64)
    u[0, -1] = 1.0  # an impulse at the last position must not wrap around to the start
    k = torch.ones(S, dtype=torch.float64)
    y = fft_causal_conv(u, k)
    assert torch.allclose(y[0, :-1], torch.zeros(S - 1, dtype=torch.float64), atol=1e-12)
    assert y[0, -1].item() == pytest.approx(1.0)


@pytest.mark.parametrize("with_bias", [True, False])
def test_multi_head_long_conv_forms_match_explicit_loop(with_bias):
    B, H, hd, S = 2, 3, 4, int(torch.randint(4, 24, ()).item())
    q, k, v = (torch.randn(B, H, hd, S, dtype=torch.float64) for _ in range(3))
    h = torch.randn(H, S, dtype=torch.float64)
    bias = torch.randn(H, dtype=torch.float64) if with_bias else None
    expected = _heads_loop(q, k, v, h, bias)
    torch.testing.assert_close(heads_long_conv_fft(q, k, v, h, bias), expected)
    torch.testing.assert_close(heads_long_conv_quadratic(q, k, v, h, bias), expected)


# --- slow references for the whole blocks ---------------------------------------------------


def _implicit_filter_reference(blk, P, S):
    """safari's HyenaFilter written out: features of t, sine FFN, exponential decay window."""
    L = blk.max_len
    E = blk.filter.inp.in_features
    bands = (E - 1) // 2
    step = (bands - 1 - 1e-4) / (bands - 1) if bands > 1 else 0.0
    freqs = [1e-4 + step * b for b in range(bands)]
    z = torch.tensor(
        [
            [t / (L - 1)]
            + [math.cos(f * 2 * math.pi * t / L) for f in freqs]
            + [-math.sin(f * 2 * math.pi * t / L) for f in freqs]
            for t in range(S)
        ],
        dtype=torch.float64,
    )
    freq = P["filter.freq"]
    a = torch.sin(freq * (z @ P["filter.inp.weight"].T + P["filter.inp.bias"]))
    i = 0
    while f"filter.hidden.{i}.weight" in P:
        a = torch.sin(freq * (a @ P[f"filter.hidden.{i}.weight"].T + P[f"filter.hidden.{i}.bias"]))
        i += 1
    filt = a @ P["filter.out.weight"].T  # (S, C)
    C = filt.shape[1]
    lo, hi = math.log(1e-2) / 1.5, math.log(1e-2) / 0.3
    deltas = torch.tensor([abs(lo + (hi - lo) * c / max(C - 1, 1)) for c in range(C)])
    t_unit = torch.arange(S, dtype=torch.float64)[:, None] / (L - 1)
    return (filt * torch.exp(-t_unit * deltas.double())).T  # (C, S)


def _projections_reference(blk, P, x):
    """Norm, in-projection tiled proj_groups times, short causal depthwise conv by a loop."""
    u = torch.nn.functional.layer_norm(x, (blk.d_model,), P["norm.weight"], None, blk.norm.eps)
    p = u @ P["in_proj.weight"].T + P["in_proj.bias"]
    p = torch.cat([p] * blk.proj_groups, dim=-1).transpose(1, 2)  # (B, W, S)
    w, K, S = P["short_filter.weight"][:, 0, :], blk.short_filter_order, x.shape[1]
    out = P["short_filter.bias"][None, :, None].expand_as(p).clone()
    for t in range(S):
        for j in range(K):
            s = t - (K - 1) + j
            if s >= 0:
                out[..., t] += w[:, j] * p[..., s]
    return out


def _hyena_reference(blk, x):
    P = {n: p.detach().double() for n, p in blk.named_parameters()}
    x = x.double()
    S, D, N = x.shape[1], blk.inner, blk.order
    chunks = _projections_reference(blk, P, x).split(D, dim=1)
    gates, v = chunks[:-1], chunks[-1]
    h = _implicit_filter_reference(blk, P, S).reshape(N - 1, D, S)
    bias = P["filter_bias"].reshape(N - 1, D) if "filter_bias" in P else None
    for o in range(N - 1):
        v = v * gates[N - 1 - o]
        conv = _direct_causal_conv(v, h[o].expand_as(v))
        v = conv + (bias[o][:, None] * v if bias is not None else 0)
    y = (v * gates[0]).transpose(1, 2)
    return x + y @ P["out_proj.weight"].T + P["out_proj.bias"]


def _mh_hyena_reference(blk, x):
    P = {n: p.detach().double() for n, p in blk.named_parameters()}
    x = x.double()
    B, S, _ = x.shape
    shape = (B, blk.num_heads, blk.head_dim, S)
    q, v, k = (c.reshape(shape) for c in _projections_reference(blk, P, x).split(blk.inner, dim=1))
    h = _implicit_filter_reference(blk, P, S)  # (H, S)
    y = _heads_loop(q, k, v, h, P.get("filter_bias"))
    y = y.reshape(B, blk.inner, S).transpose(1, 2)
    return x + y @ P["out_proj.weight"].T + P["out_proj.bias"]


@pytest.mark.parametrize("opts", [
    {},
    {"inner_factor": 1, "proj_groups": 1},
    {"order": 3, "inner_factor": 1, "proj_groups": 2, "filter_depth": 1},
    {"filter_bias": False, "emb_dim": 5, "short_filter_order": 4},
])
def test_hyena_matches_slow_reference(opts):
    blk = _build("hyena", **opts).eval()
    x = torch.randn(2, int(torch.randint(8, 24, ()).item()), D_MODEL)
    with torch.no_grad():
        got = blk(x)
    torch.testing.assert_close(got.double(), _hyena_reference(blk, x), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("opts", [
    {},  # head_dim 16: the quadratic (Toeplitz) path
    {"head_dim": 2},  # 2 * head_dim^2 = 8 < S: the FFT path
    {"head_dim": 4, "proj_groups": 1, "filter_bias": False},
])
def test_mh_hyena_matches_slow_reference(opts):
    blk = _build("mh_hyena", d_model=32, **opts).eval()
    x = torch.randn(2, int(torch.randint(12, 24, ()).item()), 32)
    with torch.no_grad():
        got = blk(x)
    torch.testing.assert_close(got.double(), _mh_hyena_reference(blk, x), rtol=1e-4, atol=1e-4)


def test_implicit_filter_decays_along_time():
    blk = _build("hyena", inner_factor=1, proj_groups=1)
    with torch.no_grad():
        h = blk.filter(MAX_LEN)  # (D, L)
        window = torch.exp(-blk.filter.t[:, 0] * blk.filter.deltas[:, None])
    # fastest channel decays to 1e-2 at 30 % of max_len, slowest at 150 %
    assert window[-1, int(0.3 * (MAX_LEN - 1))] == pytest.approx(1e-2, rel=0.1)
    assert window[0, -1] == pytest.approx(1e-2 ** (1 / 1.5), rel=1e-3)
    assert h.shape == (D_MODEL, MAX_LEN) and torch.isfinite(h).all()


# --- parameter counts and state sizes ------------------------------------------------------


def _filter_params(E, F, depth, C, bias):
    return E * F + F + depth * (F * F + F) + F * C + F + (C if bias else 0)


@pytest.mark.parametrize("opts", [{}, {"order": 3, "inner_factor": 2, "proj_groups": 1}])
def test_hyena_parameter_count(opts):
    blk = _build("hyena", **opts)
    d, N = D_MODEL, opts.get("order", 2)
    D = opts.get("inner_factor", 4) * d
    P, K = opts.get("proj_groups", 4), 3
    W = (N + 1) * D
    expected = d  # norm
    expected += d * (W // P) + W // P  # in_proj (tied groups)
    expected += W * K + W  # short depthwise conv
    expected += _filter_params(3, 4, 2, (N - 1) * D, True)
    expected += D * d + d  # out_proj
    assert blk.num_params() == expected


def test_mh_hyena_parameter_count():
    d, hd = 32, 8
    blk = _build("mh_hyena", d_model=d, head_dim=hd)
    W = 3 * d
    expected = d + d * (W // 4) + W // 4 + W * 3 + W + _filter_params(3, 2, 2, d // hd, True)
    expected += d * d + d
    assert blk.num_params() == expected


def test_hyena_state_size_follows_zoology():
    # inner width = d_model, order 2, no short conv window: zoology's Hyena, d_model * seq_len
    blk = _build("hyena", inner_factor=1, proj_groups=1, short_filter_order=1)
    for L in (16, 128):
        assert blk.state_size(L) == D_MODEL * L
    blk = _build("hyena", order=3)  # defaults: inner 4d, short filter 3
    D = 4 * D_MODEL
    assert blk.state_size(100) == 2 * D * 100 + 2 * 4 * D


def test_mh_hyena_state_grows_with_head_dim():
    for hd in (2, 8, 16):
        blk = _build("mh_hyena", d_model=32, head_dim=hd)
        assert blk.state_size(64) == 32 * hd * 64 + 2 * 3 * 32


@pytest.mark.parametrize("name,bad", [
    ("hyena", {"order": 1}),
    ("hyena", {"order": 2.5}),
    ("hyena", {"inner_factor": 0}),
    ("hyena", {"proj_groups": 5}),
    ("hyena", {"emb_dim": 4}),
    ("hyena", {"emb_dim": 1}),
    ("hyena", {"filter_order": 0}),
    ("hyena", {"short_filter_order": 0}),
    ("hyena", {"filter_bias": "yes"}),
    ("hyena", {"num_heads": 2}),
    ("mh_hyena", {"head_dim": 5}),
    ("mh_hyena", {"head_dim": 0}),
    ("mh_hyena", {"proj_groups": 7}),
    ("mh_hyena", {"order": 3}),
])
def test_hyena_rejects_bad_options(name, bad):
    with pytest.raises(blocks.BlockError):
        blocks.build(name, D_MODEL, MAX_LEN, **bad)
