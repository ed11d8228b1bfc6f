"""The MLX twins of the mLSTM and sLSTM blocks (blocks/mlx/mlstm.py, blocks/mlx/slstm.py): every
option that changes the maths, weights moved away from their initialisation (which leaves gate
weights and the recurrent kernel at zero), and the twin cell functions against the torch ones.

Inputs and weights are fresh random draws each run (never seeded here).
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import blocks

pytest.importorskip("mlx.core")
import mlx_parity as P  # noqa: E402

mx = P.load()

import blocks.mlstm as tm  # noqa: E402
import blocks.slstm as ts  # noqa: E402
from blocks.mlx import mlstm as mm  # noqa: E402
from blocks.mlx import slstm as ms  # noqa: E402

D_MODEL, MAX_LEN = 32, 64


def rng() -> np.random.Generator:
    return np.random.default_rng()


def seq_len(lo: int = 9, hi: int = 40, not_multiple_of: int | None = None) -> int:
    """A random length in [lo, hi), not a multiple of ``not_multiple_of`` (when above 1)."""
    while True:
        S = int(rng().integers(lo, hi))
        if not_multiple_of is None or not_multiple_of == 1 or S % not_multiple_of:
            return S


def randomised_pair(name: str, d_model: int = D_MODEL, **options):
    """:func:`mlx_parity.pair`, then every torch weight moved off its initial value by random
    noise (half its spread; 0.5 for constants; R ~ N(0, 1/DH)), copied into the twin again."""
    tblock, mblock = P.pair(name, d_model, MAX_LEN, **options)
    with torch.no_grad():
        for n, p in tblock.named_parameters():
            if n == "R":
                p.normal_(0.0, p.shape[1] ** -0.5)
                continue
            spread = float(p.std()) if p.numel() > 1 else 0.0
            p.add_(torch.randn_like(p) * (0.5 * spread if spread > 1e-6 else 0.5))
    mblock.load_weights([(k, P.to_mx(v)) for k, v in tblock.state_dict().items()], strict=True)
    return tblock, mblock


def torch_out_and_grads(fn, inputs, cot):
    leaves = [t.clone().requires_grad_() for t in inputs]
    y = fn(*leaves)
    (y * cot).sum().backward()
    return y.detach(), [t.grad for t in leaves]


def mlx_out_and_grads(fn, inputs, cot):
    args = [P.to_mx(t) for t in inputs]
    cotm = P.to_mx(cot)
    y = fn(*args)
    grads = mx.grad(lambda *a: (fn(*a) * cotm).sum(), argnums=tuple(range(len(args))))(*args)
    return y, grads


def assert_close_rel(what, t, m, rtol=2e-4, atol=0.0):
    """``|t - m| <= atol + rtol * max|t|`` (the measure of :func:`mlx_parity.compare`)."""
    P._close(what, t, m, rtol, atol)


# --------------------------------------------------------------------------------------------
# mLSTM block


MLSTM_OPTIONS = [
    {},
    {"cell": "parallel"},
    {"cell": "recurrent"},
    {"cell": "chunkwise", "chunk_size": 4},
    {"cell": "chunkwise", "chunk_size": 7},
    {"cell": "chunkwise", "chunk_size": 1},
    {"cell": "auto", "chunk_size": 4},  # 8 < S: the chunkwise form
    {"num_heads": 1},
    {"num_heads": 2},
    {"num_heads": 16, "cell": "chunkwise", "chunk_size": 5},
    {"qkv_block_size": 1},
    {"qkv_block_size": 16},
    {"conv_kernel": 1},
    {"conv_kernel": 7},
    {"proj_factor": 3.0},
    {"block_index": 1, "num_blocks": 3},
]


@pytest.mark.parametrize("options", MLSTM_OPTIONS, ids=str)
def test_mlstm_twin_matches_torch_with_options(options):
    tblock, mblock = randomised_pair("mlstm", **options)
    S = seq_len(not_multiple_of=options.get("chunk_size"))
    assert mblock.cell_for(S) == tblock.cell_for(S, "cpu")
    # rtol 5e-4, not 2e-4: a gate bias's gradient (one entry per head) is a sum over batch and
    # steps of terms that mostly cancel, so float32 rounding of the terms is large against it
    P.compare(tblock, mblock, torch.randn(2, S, D_MODEL), rtol=5e-4)


def test_mlstm_twin_picks_the_torch_blocks_form():
    chunk = int(rng().integers(1, 20))
    tblock = blocks.build("mlstm", D_MODEL, MAX_LEN, chunk_size=chunk)
    mblock = blocks.build("mlstm", D_MODEL, MAX_LEN, backend="mlx", chunk_size=chunk)
    limit = tm.AUTO_PARALLEL_MAX_CHUNKS * chunk
    for S in (1, limit, limit + 1, limit + int(rng().integers(2, 50))):
        assert mblock.cell_for(S) == tblock.cell_for(S, "cpu")
    assert mblock.cell_for(limit) == "parallel" and mblock.cell_for(limit + 1) == "chunkwise"


def test_mlstm_twin_forms_agree_with_each_other():
    """The same twin weights under every cell option give the same block output."""
    tblock, _ = randomised_pair("mlstm", num_heads=2)
    weights = [(k, P.to_mx(v)) for k, v in tblock.state_dict().items()]
    S = seq_len(20, 40, not_multiple_of=6)
    x = mx.array(rng().standard_normal((2, S, D_MODEL)).astype(np.float32))
    outs = {}
    for cell in ("parallel", "chunkwise", "recurrent"):
        m = blocks.build("mlstm", D_MODEL, MAX_LEN, backend="mlx", num_heads=2, cell=cell,
                         chunk_size=6)
        m.load_weights(weights, strict=True)
        outs[cell] = P.to_np(m(x))
    for cell, y in outs.items():
        np.testing.assert_allclose(y, outs["parallel"], rtol=1e-4, atol=1e-4, err_msg=cell)


def test_mlstm_twin_chunkwise_is_causal():
    _, mblock = randomised_pair("mlstm", cell="chunkwise", chunk_size=5)
    _assert_causal(mblock)


# --------------------------------------------------------------------------------------------
# mLSTM cell functions

# gate regimes: (input-gate mean, input-gate spread, forget-gate mean, forget-gate spread)
REGIMES = {
    "moderate": (0.0, 1.0, 3.0, 1.0),
    "input_near_+10": (10.0, 3.0, 3.0, 2.0),
    "input_very_negative": (-30.0, 3.0, 0.0, 3.0),  # the stabiliser switches along the sequence
    "forget_closed": (0.0, 3.0, -5.0, 2.0),
    "forget_open": (2.0, 2.0, 8.0, 1.0),
    "input_-200": (-200.0, 3.0, 3.0, 1.0),
    "input_-1000": (-1000.0, 3.0, 3.0, 1.0),
    "input_+60": (60.0, 3.0, 3.0, 1.0),
}


def cell_inputs(regime, S, *, B=2, NH=2, DQK=8, DV=6, positive_qk=False):
    i_mean, i_std, f_mean, f_std = REGIMES[regime]
    q, k = torch.randn(B, NH, S, DQK), torch.randn(B, NH, S, DQK)
    if positive_qk:  # q . k > 0: no cancellation in the normaliser, gradients well conditioned
        q, k = q.abs(), k.abs()
    v = torch.randn(B, NH, S, DV)
    return q, k, v, i_mean + i_std * torch.randn(B, NH, S), f_mean + f_std * torch.randn(B, NH, S)


def cell_forms(S):
    """(name, torch form, twin form) with a chunk size that leaves a remainder."""
    chunk = int(rng().integers(2, max(3, S // 2)))
    while S % chunk == 0:
        chunk += 1
    return [
        ("parallel", tm.mlstm_parallel, mm.mlstm_parallel),
        (f"chunkwise{chunk}", lambda *a, **k: tm.mlstm_chunkwise(*a, chunk_size=chunk, **k),
         lambda *a, **k: mm.mlstm_chunkwise(*a, chunk_size=chunk, **k)),
        ("recurrent", tm.mlstm_recurrent, mm.mlstm_recurrent),
    ]


def conditioning(q, k, v, i_pre, f_pre):
    """How much rounding each output h_t can amplify (B, NH, S), in float64: the sum of
    ``w_tj |q_t| . |k_j| / sqrt(d)`` over the normaliser (large where it nearly cancels)."""
    q, k, v, i_pre, f_pre = (t.double() for t in (q, k, v, i_pre, f_pre))
    S, d = q.shape[-2], q.shape[-1]
    cum = torch.cumsum(F.logsigmoid(f_pre), -1)
    log_d = cum[..., :, None] - cum[..., None, :] + i_pre[..., None, :]
    log_d = log_d.masked_fill(~torch.ones(S, S, dtype=torch.bool).tril(), -math.inf)
    m = torch.maximum(log_d.amax(-1), cum)
    w = torch.exp(log_d - m[..., None])
    qk = q @ k.transpose(-1, -2) / math.sqrt(d)
    qk_abs = q.abs() @ k.abs().transpose(-1, -2) / math.sqrt(d)
    return (w * qk_abs).sum(-1) / torch.maximum((w * qk).sum(-1).abs(), torch.exp(-m))


# float32 exp(-200) underflows where float64's does not: no float32 form is "within rounding"
# of float64 there (outputs ~1e-87); those regimes are in the gradient test below
UNDERFLOWING = ("input_-200", "input_-1000")


@pytest.mark.parametrize("regime", sorted(set(REGIMES) - set(UNDERFLOWING)))
def test_mlstm_cells_match_torch_to_float32_rounding(regime):
    """Signed q, k: each twin form is within float32 rounding of the float64 torch result,
    the error measured against the problem's conditioning (as tests/test_mlstm.py does)."""
    S = seq_len(30, 80)
    args = cell_inputs(regime, S)
    ref = tm.mlstm_parallel(*(t.double() for t in args))
    scale = conditioning(*args)[..., None] * (ref.abs() + args[2].abs().amax())
    for name, _, form in cell_forms(S):
        h = P.to_np(form(*(P.to_mx(t) for t in args)))
        assert h.dtype == np.float32 and np.isfinite(h).all(), name
        err = ((torch.from_numpy(h).double() - ref).abs() / scale).max().item()
        assert err < 2e-5, f"{name}: scaled error {err:.2e}"


@pytest.mark.parametrize("regime", sorted(REGIMES))
def test_mlstm_cell_gradients_match_torch(regime):
    """Positive q, k (a normaliser far from cancelling): outputs and the gradients of all five
    inputs of each twin form equal the torch form's, and are finite at extreme input gates."""
    S = seq_len(40, 90)  # "input_very_negative" switches stabiliser from step ~40 on
    args = cell_inputs(regime, S, positive_qk=True)
    cot = torch.randn(*args[2].shape)
    for name, tform, mform in cell_forms(S):
        y, grads = torch_out_and_grads(tform, args, cot)
        ym, gradsm = mlx_out_and_grads(mform, args, cot)
        assert np.isfinite(P.to_np(ym)).all(), name
        assert_close_rel(f"{name} output", y, ym)
        for what, g, gm in zip(("q", "k", "v", "i_preact", "f_preact"), grads, gradsm):
            assert np.isfinite(P.to_np(gm)).all(), f"{name} d{what}"
            assert_close_rel(f"{name} gradient of {what}", g, gm)


def test_mlstm_cell_eps_enters_as_in_torch():
    """eps = 0 against the default: the difference (the eps term alone) is the torch one's."""
    args = cell_inputs("moderate", seq_len(20, 40), positive_qk=True)
    eps = float(10 ** rng().uniform(-2.5, -1))  # a difference well above float32 rounding
    margs = [P.to_mx(t) for t in args]
    for name, tform, mform in cell_forms(args[0].shape[-2]):
        t_diff = tform(*args, eps=eps) - tform(*args, eps=0.0)
        m_diff = mform(*margs, eps=eps) - mform(*margs, eps=0.0)
        assert_close_rel(f"{name} eps term", t_diff, m_diff, rtol=2e-3, atol=1e-6)


def test_mlstm_cell_keeps_precision_on_long_sequences():
    """Leaky forget gates over 1024 steps (|F| ~ 1000): F_t - F_j is not the difference of two
    float32 cumulative sums (off by ~1e-4 in the exponent), as in the torch cell."""
    args = cell_inputs("moderate", 1024, B=1, DQK=16, DV=16, positive_qk=True)
    q, k, v, i_pre, _ = args
    f_pre = -0.5 + 0.5 * torch.randn_like(i_pre)
    ref = tm.mlstm_parallel(*(t.double() for t in (q, k, v, i_pre, f_pre)))
    margs = [P.to_mx(t) for t in (q, k, v, i_pre, f_pre)]
    for name, h in (("parallel", mm.mlstm_parallel(*margs)),
                    ("chunkwise", mm.mlstm_chunkwise(*margs, chunk_size=64))):
        err = (np.abs(P.to_np(h) - ref.numpy()).max() / ref.abs().max()).item()
        assert err < 2e-6, f"{name}: relative error {err:.2e}"


def test_mlstm_cell_low_precision_inputs_compute_in_float32():
    args = [P.to_mx(t) for t in cell_inputs("moderate", seq_len(20, 40))]
    low = [a.astype(mx.bfloat16) for a in args]
    for name, _, form in cell_forms(args[0].shape[-2]):
        h = form(*low)
        assert h.dtype == mx.bfloat16, name
        expected = form(*(a.astype(mx.float32) for a in low)).astype(mx.bfloat16)
        assert mx.array_equal(h, expected), name


# --------------------------------------------------------------------------------------------
# sLSTM block

SLSTM_OPTIONS = [
    {},
    {"num_heads": 1},
    {"num_heads": 2},
    {"num_heads": 8},
    {"conv_kernel": 0},
    {"conv_kernel": 1},
    {"conv_kernel": 6},
    {"ffn_factor": 2.5},
    {"block_index": 2, "num_blocks": 3},
]


@pytest.mark.parametrize("options", SLSTM_OPTIONS, ids=str)
def test_slstm_twin_matches_torch_with_options(options):
    """With a non-zero recurrent kernel R (memory mixing) and wide gate biases."""
    tblock, mblock = randomised_pair("slstm", **options)
    P.compare(tblock, mblock, torch.randn(2, seq_len(), D_MODEL))


def test_slstm_twin_forget_bias_depends_on_depth_as_torch():
    num_blocks = int(rng().integers(2, 9))
    block_index = int(rng().integers(0, num_blocks))
    heads = int(rng().choice([1, 2, 4, 8]))
    kw = {"block_index": block_index, "num_blocks": num_blocks, "num_heads": heads}
    t = blocks.build("slstm", D_MODEL, MAX_LEN, **kw)
    m = blocks.build("slstm", D_MODEL, MAX_LEN, backend="mlx", **kw)
    np.testing.assert_allclose(P.to_np(m.b), t.b.detach().numpy(), rtol=1e-6, atol=1e-6)
    assert not mx.any(m.R).item() and mx.all(m.group_norm_weight == 1).item()


def test_slstm_twin_without_conv_is_causal():
    _, mblock = randomised_pair("slstm", conv_kernel=0)
    _assert_causal(mblock)


# --------------------------------------------------------------------------------------------
# sLSTM cell functions


def slstm_inputs(B, S, NH, DH, *, i_shift=0.0):
    """wx with wide gates (the stabiliser switches between ĩ and log f + m), R ~ N(0, 1/DH)."""
    H = NH * DH
    wx = torch.randn(B, S, 4, H) * torch.tensor([3.0, 3.0, 1.0, 1.0])[:, None]
    wx[:, :, 0] += i_shift
    R = torch.randn(NH, DH, 4, DH) * DH**-0.5
    b = 2.0 * torch.randn(4 * H)
    return wx.reshape(B, S, 4 * H), R, b


@pytest.mark.parametrize("i_shift", [0.0, 100.0, -100.0])
def test_slstm_cell_matches_torch(i_shift):
    """The twin's scan against the torch block's scan (outputs, gradients of wx, R and b) and
    the torch step-by-step reference in float64; +-100 input gates would overflow exp
    unstabilised."""
    NH = int(rng().choice([1, 2, 4]))
    DH = int(rng().integers(2, 9))
    args = slstm_inputs(2, seq_len(5, 40), NH, DH, i_shift=i_shift)
    cot = torch.randn(*args[0].shape[:2], NH * DH)
    y, grads = torch_out_and_grads(lambda *a: ts.slstm_scan(*a, NH), args, cot)
    ym, gradsm = mlx_out_and_grads(lambda *a: ms.slstm_scan(*a, NH), args, cot)
    # gate pre-activations near +-100 carry float32 rounding of 1e-5 in every exponent
    rtol = 1e-3 if i_shift else 2e-4
    assert_close_rel("output", y, ym, rtol)
    for what, g, gm in zip(("wx", "R", "b"), grads, gradsm):
        assert np.isfinite(P.to_np(gm)).all(), what
        assert_close_rel(f"gradient of {what}", g, gm, rtol)
    ref = ts.slstm_recurrent_reference(*(t.double() for t in args), NH)
    assert_close_rel("output against the float64 reference", ref, ym, rtol=1e-5)


def test_slstm_cell_gate_order_is_i_f_z_o():
    """Swapping the input and forget gates' pre-activations changes the output (the test above
    can tell a swapped order apart), and the twin follows the torch order."""
    NH, DH = 2, 4
    wx, R, b = slstm_inputs(2, 12, NH, DH)
    i, f, z, o = wx.chunk(4, dim=-1)
    swapped = torch.cat([f, i, z, o], dim=-1)
    y = ts.slstm_scan(wx, R, b, NH)
    assert not torch.allclose(y, ts.slstm_scan(swapped, R, b, NH), atol=1e-3)
    assert_close_rel("output", y, ms.slstm_scan(P.to_mx(wx), P.to_mx(R), P.to_mx(b), NH))


# gate regimes of the sLSTM cell: (mean, spread) of the pre-activations ĩ, f̃, z̃, õ
SLSTM_REGIMES = {
    "moderate": ((0.0, 3.0), (0.0, 3.0), (0.0, 1.0), (0.0, 1.0)),
    "input_+100": ((100.0, 3.0), (0.0, 3.0), (0.0, 1.0), (0.0, 1.0)),
    "input_-100": ((-100.0, 3.0), (0.0, 3.0), (0.0, 1.0), (0.0, 1.0)),
    "input_switching": ((-30.0, 3.0), (0.0, 3.0), (0.0, 1.0), (0.0, 1.0)),  # m switches source
    "forget_closed": ((0.0, 3.0), (-30.0, 5.0), (0.0, 1.0), (0.0, 1.0)),
    "forget_-200": ((0.0, 3.0), (-200.0, 3.0), (0.0, 1.0), (0.0, 1.0)),
    "forget_open": ((0.0, 3.0), (30.0, 5.0), (0.0, 1.0), (0.0, 1.0)),
    "saturated_z_o": ((0.0, 3.0), (0.0, 3.0), (0.0, 40.0), (0.0, 40.0)),
}


def slstm_regime_inputs(regime, S, NH, DH, B=2):
    """float64 numpy ``wx (S, NH, B, 4, DH)`` (the block's time-major layout, no bias),
    ``R ~ N(0, 1/DH)``, ``b ~ N(0, 4)``, drawn fresh."""
    gen = rng()
    wx = np.stack([mean + spread * gen.standard_normal((S, NH, B, DH))
                   for mean, spread in SLSTM_REGIMES[regime]], axis=3)
    R = gen.standard_normal((NH, DH, 4, DH)) * DH**-0.5
    b = 2.0 * gen.standard_normal(4 * NH * DH)
    return wx, R, b


def _mx(a, dtype=None):
    return mx.array(a, dtype=dtype or mx.float32)


def mlx_scan_out_and_grads(scan, args, cot):
    y = scan(*args)
    grads = mx.grad(lambda *a: (scan(*a) * cot).sum(), argnums=(0, 1, 2))(*args)
    return y, grads


@pytest.mark.parametrize("regime", sorted(SLSTM_REGIMES))
def test_slstm_fast_scan_matches_autodiff_reference(regime):
    """The fast path (its own stabiliser, the hand-written backward through time) against MLX's
    autodiff of the plain loop, float32, fresh inputs: outputs and the gradients of wx, R and b
    agree to float32 rounding and are finite, at extreme gates too."""
    NH = int(rng().choice([1, 2, 4]))
    S, DH = seq_len(2, 60), int(rng().integers(2, 9))
    wx, R, b = (_mx(a) for a in slstm_regime_inputs(regime, S, NH, DH))
    cot = _mx(rng().standard_normal((S, NH, 2, DH)))
    y, grads = mlx_scan_out_and_grads(ms.slstm_scan_time_major, (wx, R, b), cot)
    y_ref, grads_ref = mlx_scan_out_and_grads(ms.slstm_scan_time_major_reference, (wx, R, b), cot)
    # pre-activations near +-100 carry float32 rounding of 1e-5 in every exponent
    rtol = 1e-4 if "100" in regime else 2e-5
    for what, a, ref in zip(("output", "wx", "R", "b"), (y, *grads), (y_ref, *grads_ref)):
        a, ref = P.to_np(a), P.to_np(ref)
        assert np.isfinite(a).all(), what
        err = np.abs(a - ref).max() / max(np.abs(ref).max(), 1e-30)
        assert err <= rtol, f"{what}: relative difference {err:.2e}"


@pytest.mark.parametrize("regime", sorted(SLSTM_REGIMES))
def test_slstm_fast_scan_float64_matches_torch_reference(regime):
    """In float64 the fast path equals the torch block's step-by-step autograd reference
    (stabiliser with logsigmoid, gradient through the max) to double rounding: its stabiliser
    and backward are the same maths, not an approximation."""
    NH = int(rng().choice([1, 2, 4]))
    S, DH = seq_len(2, 50), int(rng().integers(2, 9))
    wx, R, b = slstm_regime_inputs(regime, S, NH, DH)
    cot = rng().standard_normal((S, NH, 2, DH))
    leaves = [torch.tensor(a, requires_grad=True) for a in (wx, R, b)]
    wx_bs = leaves[0].permute(2, 0, 3, 1, 4).reshape(2, S, 4 * NH * DH)  # (B, S, 4H)
    y_ref = ts.slstm_recurrent_reference(wx_bs, leaves[1], leaves[2], NH)
    y_ref = y_ref.view(2, S, NH, DH).permute(1, 2, 0, 3)  # (S, NH, B, DH)
    (y_ref * torch.tensor(cot)).sum().backward()
    args = [_mx(a, mx.float64) for a in (wx, R, b)]
    y, grads = mlx_scan_out_and_grads(ms.slstm_scan_time_major, args, _mx(cot, mx.float64))
    assert y.dtype == mx.float64 and all(g.dtype == mx.float64 for g in grads)
    for what, a, ref in zip(("output", "wx", "R", "b"), (y, *grads),
                            (y_ref, *(t.grad for t in leaves))):
        assert_close_rel(what, ref, a, rtol=1e-11)


def test_slstm_fast_scan_without_values_inside_compile():
    """Inside ``mx.compile`` the fast path has no values to copy and runs its maths uncompiled:
    same outputs and gradients; one- and two-step sequences included."""
    NH, DH = 2, 4

    def out_and_grads(wx, R, b, cot):
        return mlx_scan_out_and_grads(ms.slstm_scan_time_major, (wx, R, b), cot)

    compiled = mx.compile(out_and_grads)
    for S in (1, 2, seq_len(5, 30)):
        wx, R, b = (_mx(a) for a in slstm_regime_inputs("moderate", S, NH, DH))
        cot = _mx(rng().standard_normal((S, NH, 2, DH)))
        y, grads = out_and_grads(wx, R, b, cot)
        y_c, grads_c = compiled(wx, R, b, cot)
        y_ref, grads_ref = mlx_scan_out_and_grads(
            ms.slstm_scan_time_major_reference, (wx, R, b), cot)
        for a, c, ref in zip((y, *grads), (y_c, *grads_c), (y_ref, *grads_ref)):
            np.testing.assert_allclose(P.to_np(c), P.to_np(a), rtol=1e-5, atol=1e-6)
            np.testing.assert_allclose(P.to_np(a), P.to_np(ref), rtol=1e-4, atol=1e-5)


def grad_of_sum(fn, x):
    return mx.grad(lambda a: fn(a).sum())(x)


def test_slstm_block_elementwise_functions_match_nn():
    """The block's GELU-gated product and SiLU (written with libm's pow, their backward by
    hand) against ``nn.gelu`` and ``nn.silu``: values and gradients, float32, from 0 to
    +-1e4; in float64 against the exact functions (GELU to the 1.5e-7 of the erf
    approximation MLX and torch use)."""
    import math

    import mlx.nn as mnn

    x = np.concatenate([[0.0, 1e-3, -1e-3, 5.0, -5.0, 30.0, -30.0, 88.0, -88.0, 100.0, -100.0,
                         1e4, -1e4], 4.0 * rng().standard_normal(200)])
    b = rng().standard_normal(x.size)
    cases = [
        ("gelu_gated", lambda a: ms.gelu_gated(a, _mx(b, a.dtype)),
         lambda a: mnn.gelu(a) * _mx(b, a.dtype)),
        ("silu", ms.silu, mnn.silu),
    ]
    for name, fast, ref in cases:
        xm = _mx(x)
        for got, want in ((fast(xm), ref(xm)), (grad_of_sum(fast, xm), grad_of_sum(ref, xm))):
            got, want = P.to_np(got), P.to_np(want)
            assert np.isfinite(got).all(), name
            np.testing.assert_allclose(got, want, rtol=2e-6, atol=3e-7, err_msg=name)
    # float64: exact GELU and SiLU, and their derivatives
    with np.errstate(over="ignore"):
        sig = 1.0 / (1.0 + np.exp(-x))
    cdf = 0.5 * (1.0 + np.vectorize(math.erf)(x / math.sqrt(2.0)))
    pdf = np.exp(-0.5 * x * x) / math.sqrt(2.0 * math.pi)
    exact = {"gelu_gated": (x * cdf * b, (cdf + x * pdf) * b),
             "silu": (x * sig, sig * (1 + x * (1 - sig)))}
    for name, fast, _ in cases:
        xm = _mx(x, mx.float64)
        value, grad = fast(xm), grad_of_sum(fast, xm)
        assert value.dtype == grad.dtype == mx.float64
        for what, got, want in (("value", value, exact[name][0]),
                                ("gradient", grad, exact[name][1])):
            err = np.abs(P.to_np(got) - want)
            if name == "gelu_gated":  # Phi off by at most 0.75e-7, scaled by |x b| and |b|
                assert (err <= 1e-7 * (1.0 + np.abs(x)) * np.abs(b) + 1e-300).all(), what
            else:
                assert (err <= 1e-13 * (1.0 + np.abs(want))).all(), f"silu {what}"


# --------------------------------------------------------------------------------------------
# both blocks


def _assert_causal(mblock):
    S = 24
    x = rng().standard_normal((2, S, D_MODEL)).astype(np.float32)
    t = int(rng().integers(0, S - 1))
    x2 = x.copy()
    x2[:, t + 1:] = 3 * rng().standard_normal((2, S - t - 1, D_MODEL))
    y, y2 = P.to_np(mblock(mx.array(x))), P.to_np(mblock(mx.array(x2)))
    np.testing.assert_allclose(y[:, : t + 1], y2[:, : t + 1], rtol=1e-5, atol=1e-5)
    assert not np.allclose(y[:, t + 1:], y2[:, t + 1:])


@pytest.mark.parametrize("name,options", [
    ("mlstm", {"num_heads": 2, "conv_kernel": 3, "qkv_block_size": 8, "proj_factor": 3.0}),
    ("mlstm", {"num_heads": 16}),
    ("slstm", {"num_heads": 8, "conv_kernel": 0}),
    ("slstm", {"num_heads": 2, "conv_kernel": 7, "ffn_factor": 2.5}),
], ids=str)
def test_twin_params_and_state_size_with_options(name, options):
    t = blocks.build(name, D_MODEL, MAX_LEN, **options)
    m = blocks.build(name, D_MODEL, MAX_LEN, backend="mlx", **options)
    assert m.num_params() == t.num_params()
    assert m.state_size(int(rng().integers(1, 500))) == t.state_size(1)


@pytest.mark.parametrize("name,options,match", [
    ("mlstm", {"cell": "fastest"}, "cell must be one of"),
    ("mlstm", {"num_heads": 3}, "not divisible by num_heads"),
    ("slstm", {"conv_kernel": -1}, "conv_kernel"),
    ("slstm", {"num_heads": 5}, "num_heads"),
])
def test_twin_refuses_bad_options_like_torch(name, options, match):
    with pytest.raises(blocks.BlockError, match=match):
        blocks.build(name, D_MODEL, MAX_LEN, **options)
    with pytest.raises(blocks.BlockError, match=match):
        blocks.build(name, D_MODEL, MAX_LEN, backend="mlx", **options)
