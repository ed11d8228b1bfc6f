"""MLX twins of the convolution and state-space blocks (hyena, mh_hyena, short_conv, mamba):
parity with the torch blocks for every option that changes the maths, at sequence lengths that
are not powers of two and at the block's max_len; the twins' kernels against the torch ones;
initialisation under non-default options. Inputs and weights are fresh random draws every run."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import blocks

pytest.importorskip("mlx.core")
import mlx_parity as P  # noqa: E402

mx = P.load()
from blocks import hyena as torch_hyena  # noqa: E402
from blocks import mamba as torch_mamba  # noqa: E402
from blocks.mlx import hyena as mlx_hyena  # noqa: E402
from blocks.mlx import mamba as mlx_mamba  # noqa: E402

D_MODEL, MAX_LEN = 16, 46  # max_len deliberately not a power of two
RNG = np.random.default_rng()


def _odd_length(low: int = 5, high: int = MAX_LEN) -> int:
    """A random sequence length in [low, high) that is not a power of two."""
    return int(RNG.choice([n for n in range(low, high) if n & (n - 1)]))


def _check(name, options, lengths=None, d_model=D_MODEL, max_len=MAX_LEN, batch=2):
    tblock, mblock = P.pair(name, d_model, max_len, **options)
    for seq in lengths or (_odd_length(high=max_len), max_len):
        tblock.zero_grad(set_to_none=True)  # P.compare reads .grad, which backward accumulates
        P.compare(tblock, mblock, torch.randn(batch, seq, d_model))


def _ids(value):
    return ",".join(f"{k}={v}" for k, v in value.items()) or "defaults"


# --- parity of the blocks over their options ---------------------------------------------------

HYENA_OPTIONS = [
    {},
    {"order": 3},
    {"order": 4, "inner_factor": 1, "proj_groups": 1},
    {"inner_factor": 2, "proj_groups": 1},
    {"proj_groups": 2},
    {"proj_groups": 3},
    {"short_filter_order": 1},
    {"short_filter_order": 5},
    {"filter_order": 9},
    {"emb_dim": 5},
    {"emb_dim": 7, "filter_order": 6},
    {"filter_depth": 0},
    {"filter_depth": 3},
    {"filter_bias": False},
    {"modulate": False},
    {"order": 3, "filter_bias": False, "modulate": False},
]


@pytest.mark.parametrize("options", HYENA_OPTIONS, ids=_ids)
def test_hyena_matches_torch(options):
    _check("hyena", options)


MH_HYENA_OPTIONS = [
    {"head_dim": 16},  # the default: one head at d_model 16
    {"head_dim": 4},
    {"head_dim": 2, "inner_factor": 2},
    {"head_dim": 8, "inner_factor": 3, "proj_groups": 1},
    {"head_dim": 4, "proj_groups": 1},
    {"head_dim": 4, "proj_groups": 2},
    {"head_dim": 4, "short_filter_order": 1},
    {"head_dim": 4, "short_filter_order": 4},
    {"head_dim": 4, "filter_order": 7},
    {"head_dim": 4, "emb_dim": 5},
    {"head_dim": 4, "filter_depth": 0},
    {"head_dim": 4, "filter_bias": False},
    {"head_dim": 4, "modulate": False},
]


@pytest.mark.parametrize("options", MH_HYENA_OPTIONS, ids=_ids)
def test_mh_hyena_matches_torch(options):
    _check("mh_hyena", options)


@pytest.mark.parametrize("filter_bias", [True, False])
def test_mh_hyena_both_long_conv_forms_match_torch(filter_bias):
    """head_dim 4: the Toeplitz form runs up to S = 32, the FFT form beyond; both blocks switch
    at the same length, and each form agrees with torch's on its side of it."""
    _check("mh_hyena", {"head_dim": 4, "filter_bias": filter_bias},
           lengths=(_odd_length(5, 33), 32, 33, _odd_length(34, MAX_LEN), MAX_LEN))


def test_mh_hyena_default_at_d_model_32():
    """The default head_dim 16 with two heads, as the generic test builds it, at max_len."""
    _check("mh_hyena", {}, d_model=32, max_len=40, lengths=(_odd_length(5, 40), 40))


@pytest.mark.parametrize("kernel_size", [1, 2, 4, 7])
def test_short_conv_matches_torch(kernel_size):
    _check("short_conv", {"kernel_size": kernel_size})


def test_short_conv_kernel_longer_than_sequence():
    _check("short_conv", {"kernel_size": 9}, lengths=(3, 5, MAX_LEN))


MAMBA_OPTIONS = [
    {},
    {"d_state": 1},
    {"d_state": 5},
    {"d_conv": 1},
    {"d_conv": 2},
    {"d_conv": 6},
    {"expand": 1},
    {"expand": 1.5},
    {"expand": 3, "d_state": 3},
    {"dt_rank": 1},
    {"dt_rank": 3},
    {"conv_bias": False},
    {"bias": True},
    {"chunk_size": 1},
    {"chunk_size": 4},
    {"chunk_size": 7},
    {"chunk_size": 100},
    {"dt_min": 0.05, "dt_max": 2.0},
]


@pytest.mark.parametrize("options", MAMBA_OPTIONS, ids=_ids)
def test_mamba_matches_torch(options):
    _check("mamba", options)


def test_mamba_matches_torch_with_strong_decays():
    """Large steps and a spread of A: decays from ~1 down to underflow inside one sequence."""
    tblock, mblock = P.pair("mamba", D_MODEL, MAX_LEN, d_state=6)
    with torch.no_grad():
        tblock.dt_proj.bias.add_(torch.empty_like(tblock.dt_proj.bias).uniform_(0.0, 6.0))
        tblock.A_log.copy_(torch.empty_like(tblock.A_log).uniform_(-3.0, 4.0))
    mblock.load_weights([(k, P.to_mx(v)) for k, v in tblock.state_dict().items()], strict=True)
    for seq in (_odd_length(), MAX_LEN):
        tblock.zero_grad(set_to_none=True)
        P.compare(tblock, mblock, torch.randn(2, seq, D_MODEL))


# --- the twins' kernels against torch's ---------------------------------------------------------

def test_fft_causal_conv_matches_torch_on_any_axis():
    S = _odd_length()
    u, k = torch.randn(2, 3, S, 5), torch.randn(3, S, 5)
    want = torch_hyena.fft_causal_conv(u.transpose(-1, -2), k.transpose(-1, -2)).transpose(-1, -2)
    got = mlx_hyena.fft_causal_conv(P.to_mx(u), P.to_mx(k), axis=-2)
    np.testing.assert_allclose(P.to_np(got), want.numpy(), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("bias", [True, False])
def test_heads_long_conv_forms_match_torch(bias):
    B, H, hd, S = 2, 3, 4, _odd_length()
    q, k, v = (torch.randn(B, H, hd, S) for _ in range(3))
    h, b = torch.randn(H, S), (torch.randn(H) if bias else None)
    want = torch_hyena.heads_long_conv_quadratic(q, k, v, h, b).permute(0, 3, 1, 2).numpy()
    qm, km, vm = (P.to_mx(t.permute(0, 3, 1, 2)) for t in (q, k, v))  # (B, S, H, hd)
    hm, bm = P.to_mx(h.t()), (None if b is None else P.to_mx(b))
    for form in (mlx_hyena.heads_long_conv_quadratic, mlx_hyena.heads_long_conv_fft):
        got = P.to_np(form(qm, km, vm, hm, bm))
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4 * np.abs(want).max())


def test_implicit_filter_tables_match_torch_buffers():
    for channels, max_len, emb_dim in ((12, MAX_LEN, 3), (7, 33, 7), (1, 1, 5)):
        tf = torch_hyena.ImplicitFilter(channels, max_len, width=4, emb_dim=emb_dim)
        mf = mlx_hyena.ImplicitFilter(channels, max_len, width=4, emb_dim=emb_dim, depth=2,
                                      modulate=True)
        for name, table in zip(("z", "t", "deltas"), mf._tables):
            np.testing.assert_allclose(P.to_np(table), getattr(tf, name).numpy(), rtol=1e-6,
                                       atol=1e-7, err_msg=name)
        assert not any("table" in k for k, _ in _flat(mf.parameters()))


@pytest.mark.parametrize("chunk", [None, 1, 3, 10, 1000])
def test_selective_scan_matches_torch_reference(chunk):
    batch, seq, E, N = 2, _odd_length(), 5, 4
    u, B, C = torch.randn(batch, seq, E), torch.randn(batch, seq, N), torch.randn(batch, seq, N)
    delta = torch.rand(batch, seq, E) * 3  # strong and weak decays
    A, D = -torch.rand(E, N) * 8, torch.randn(E)
    want = torch_mamba.selective_scan_reference(u, delta, A, B, C, D).numpy()
    args = [P.to_mx(t) for t in (u, delta, A, B, C, D)]
    for scan in (lambda *a: mlx_mamba.selective_scan(*a, chunk=chunk),
                 mlx_mamba.selective_scan_reference):
        got = P.to_np(scan(*args))
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5 * np.abs(want).max())


# --- the mamba twin's fast paths: custom VJPs against MLX autodiff, kernels against float64 ---

def _scan_inputs(batch, seq, inner, state, strong):
    """Random scan inputs; ``strong``: steps up to 6 and |A| up to e^4 (decays down to underflow
    inside one step), else the mild decays of a freshly initialised block."""
    def draw(*shape):
        return RNG.standard_normal(shape).astype(np.float32)

    delta = RNG.uniform(0.0, 6.0 if strong else 0.2, (batch, seq, inner)).astype(np.float32)
    A = -np.exp(RNG.uniform(-3.0, 4.0 if strong else 1.0, (inner, state))).astype(np.float32)
    u, D = draw(batch, seq, inner), draw(inner)
    B, C = draw(batch, seq, state), draw(batch, seq, state)
    return [mx.array(v) for v in (u, delta, A, B, C, D)]


def _assert_close_to(want, got, what, rtol=1e-4):
    want, got = P.to_np(want), P.to_np(got)
    assert want.shape == got.shape, what
    scale = max(float(np.abs(want).max()), 1e-12)
    np.testing.assert_allclose(got, want, rtol=0, atol=rtol * scale, err_msg=what)


@pytest.mark.parametrize("strong", [False, True], ids=["mild", "strong"])
@pytest.mark.parametrize("seq", [1, 2, 17, 46])
def test_mamba_scan_backward_matches_autodiff(seq, strong):
    """The twin's step-by-step scan (compiled kernels, hand-written backward) against MLX
    autodiff of the plain step loop: the value and every gradient, for chunk lengths that do
    and do not divide the length (the twin's result does not depend on the chunk)."""
    args = _scan_inputs(2, seq, 5, 4, strong)
    cot = mx.array(RNG.standard_normal((2, seq, 5)).astype(np.float32))

    def loss(scan):
        return lambda *a: (scan(*a) * cot).sum()

    argnums = tuple(range(len(args)))
    want_value, want = mx.value_and_grad(loss(mlx_mamba.selective_scan_reference), argnums)(*args)
    for chunk in (None, 1, 3, 7):
        scan = loss(lambda *a, chunk=chunk: mlx_mamba.selective_scan(*a, chunk=chunk))
        value, got = mx.value_and_grad(scan, argnums)(*args)
        _assert_close_to(want_value, value, f"value, chunk {chunk}")
        for name, w, g in zip(("u", "delta", "A", "B", "C", "D"), want, got):
            _assert_close_to(w, g, f"gradient of {name}, chunk {chunk}")


def test_mamba_fast_exp_and_activations_match_float64():
    """exp(x <= 0) from float32 arithmetic, and SiLU, softplus and y * SiLU(z) built on it (values
    and gradients), against float64, compiled and as a plain graph of ops: relative error a few
    1e-6 at most, no overflow or NaN at the ends of the float32 range."""
    ends = [0.0, -0.0, 1e-30, -1e-30, 1e-8, -1e-8, 20, -20, 87, -87, 88, -88, 90, -90, 1e4, -1e4,
            3e38, -3e38]
    x32 = np.concatenate([RNG.standard_normal(3000) * 10, ends]).astype(np.float32)
    x = x32.astype(np.float64)
    with np.errstate(over="ignore"):
        sig = 1.0 / (1.0 + np.exp(-x))
    want_exp = np.exp(-np.abs(x))
    for exp in (mlx_mamba._exp_nonpositive, mx.compile(mlx_mamba._exp_nonpositive)):
        got = P.to_np(exp(mx.array(-np.abs(x32)))).astype(np.float64)
        assert np.all(np.abs(got - want_exp) <= 4e-6 * want_exp + 1e-7)
        assert np.all(got[np.abs(x) > 88] == 0)

    def check(fn, args, want_value, want_grads):
        grads = mx.grad(lambda *a: fn(*a).sum(), list(range(len(args))))(*args)
        grads = grads if len(args) > 1 else [grads]  # one argument: the gradient comes bare
        for what, w, g in (("value", want_value, fn(*args)), *zip(("grad", "grad"), want_grads,
                                                                    grads)):
            g = P.to_np(g).astype(np.float64)
            ok = np.abs(w) < 3e38  # (y * silu(z) can overflow float32 at z ~ 3e38)
            assert np.all(np.isfinite(g[ok])), f"{fn.__name__} {what}"
            # values: relative error, even where tiny; derivatives: also float32's cancellation
            # in 1 + z (1 - sigmoid(z)) near its zero
            floor = 1e-30 if what == "value" else 3e-8
            np.testing.assert_array_less(np.abs(g - w)[ok], 5e-6 * np.abs(w)[ok] + floor,
                                         err_msg=f"{fn.__name__} {what}")

    silu = x * sig
    dsilu = sig * (1 + x * (1 - sig))
    softplus = np.maximum(x, 0) + np.log1p(np.exp(-np.abs(x)))
    y32 = RNG.standard_normal(x32.shape).astype(np.float32)
    y = y32.astype(np.float64)
    xm, ym = mx.array(x32), mx.array(y32)
    plain = {k: v for k, v in mlx_mamba._KERNELS.items()}
    compiled = mlx_mamba._compiled
    try:
        for kernels in (plain, None):
            if kernels is not None:
                mlx_mamba._compiled = kernels
            check(mlx_mamba.silu, [xm], silu, [dsilu])
            check(mlx_mamba.softplus, [xm], softplus, [sig])
            check(mlx_mamba.gate, [ym, xm], y * silu, [silu, y * dsilu])
            mlx_mamba._compiled = compiled
    finally:
        mlx_mamba._compiled = compiled


@pytest.mark.parametrize("kernel", [1, 2, 4, 7])
def test_mamba_conv_backward_matches_autodiff(kernel):
    from blocks.mlx.ops import causal_depthwise_conv

    for seq in (3, _odd_length()):
        x = mx.array(RNG.standard_normal((2, seq, 6)).astype(np.float32))
        w = mx.array(RNG.standard_normal((6, 1, kernel)).astype(np.float32))
        c = mx.array(RNG.standard_normal((2, seq, 6)).astype(np.float32))
        want = mx.value_and_grad(lambda a, b, c: (causal_depthwise_conv(a, b) * c).sum(), (0, 1))
        got = mx.value_and_grad(lambda a, b, c: (mlx_mamba.causal_conv(a, b) * c).sum(), (0, 1))
        (wv, (wx, ww)), (gv, (gx, gw)) = want(x, w, c), got(x, w, c)
        for what, a, b in (("value", wv, gv), ("dx", wx, gx), ("dweight", ww, gw)):
            _assert_close_to(a, b, f"{what}, kernel {kernel}, seq {seq}", rtol=1e-5)


def test_mamba_matches_torch_without_compiled_kernels():
    """Where mx.compile cannot run (no C++ compiler), the same kernels run as plain ops."""
    compiled = mlx_mamba._compiled
    mlx_mamba._compiled = dict(mlx_mamba._KERNELS)
    try:
        _check("mamba", {}, lengths=(_odd_length(),))
    finally:
        mlx_mamba._compiled = compiled


def test_mamba_inside_mx_compile_matches_eager():
    """Inside mx.compile nothing can be evaluated early: the traced path, same output and input
    gradient."""
    mblock = blocks.build("mamba", D_MODEL, MAX_LEN, backend="mlx")
    x = mx.array(RNG.standard_normal((2, _odd_length(), D_MODEL)).astype(np.float32))

    def grad(v):
        return mx.grad(lambda a: (mblock(a) ** 2).sum())(v)

    _assert_close_to(mblock(x), mx.compile(mblock)(x), "output", rtol=1e-5)
    _assert_close_to(grad(x), mx.compile(grad)(x), "input gradient", rtol=1e-5)


# --- initialisation under non-default options ---------------------------------------------------

def _flat(tree):
    from mlx.utils import tree_flatten

    return tree_flatten(tree)


def _ks_statistic(a: np.ndarray, b: np.ndarray) -> float:
    """Two-sample Kolmogorov-Smirnov statistic sup |F_a - F_b| (ties handled)."""
    grid = np.union1d(a, b)
    fa = np.searchsorted(np.sort(a), grid, side="right") / a.size
    fb = np.searchsorted(np.sort(b), grid, side="right") / b.size
    return float(np.abs(fa - fb).max())


INIT_CASES = [
    ("hyena", {"order": 3, "filter_order": 8, "emb_dim": 5, "filter_depth": 1,
               "short_filter_order": 5, "inner_factor": 2, "proj_groups": 2}),
    ("hyena", {"filter_bias": False}),
    ("mh_hyena", {"head_dim": 4, "filter_order": 6}),
    ("short_conv", {"kernel_size": 5}),
    ("mamba", {"d_state": 4, "expand": 1.5, "dt_rank": 3, "dt_min": 0.01, "dt_max": 0.5,
               "dt_init_floor": 0.05, "conv_bias": False, "bias": True}),
]


@pytest.mark.parametrize("name,options", INIT_CASES, ids=lambda v: v if isinstance(v, str) else
                         _ids(v))
def test_initialisation_matches_torch_under_options(name, options):
    """Same names and shapes; constants equal; every random parameter, pooled over enough draws
    for about 600 values (at most 80 draws), passes a two-sample Kolmogorov-Smirnov test against
    the torch block's at level 1e-5 (a test whose error rate does not depend on the sample
    size)."""
    tpool, mpool, draws, wanted = {}, {}, 0, 1
    while draws < wanted:
        torch.manual_seed(torch.seed())
        mx.random.seed(int(RNG.integers(2**31)))
        t = blocks.build(name, D_MODEL, MAX_LEN, num_blocks=2, **options)
        m = blocks.build(name, D_MODEL, MAX_LEN, backend="mlx", num_blocks=2, **options)
        tparams = {k: v.numpy().ravel() for k, v in t.state_dict().items()}
        mparams = {k: P.to_np(v).ravel() for k, v in _flat(m.parameters())}
        assert sorted(tparams) == sorted(mparams)
        for k in tparams:
            assert tparams[k].shape == mparams[k].shape, k
            tpool.setdefault(k, []).append(tparams[k])
            mpool.setdefault(k, []).append(mparams[k])
        if draws == 0:
            smallest = min(v.size for v in tparams.values() if v.std() > 1e-7)
            wanted = int(np.clip(np.ceil(600 / smallest), 4, 80))
        draws += 1
    for k in tpool:
        a, b = np.concatenate(tpool[k]), np.concatenate(mpool[k])
        if np.allclose(np.tile(tpool[k][0], draws), a):  # a constant or fixed pattern
            np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-6, err_msg=k)
            continue
        # sqrt(-ln(alpha / 2) / 2) with alpha = 1e-5: the KS critical value's coefficient
        critical = np.sqrt(-np.log(0.5e-5) / 2) * np.sqrt(2.0 / a.size)
        assert _ks_statistic(a, b) <= critical, f"{name}.{k}: distributions differ"
