"""The sLSTM cell (fast path against the step-by-step definition) and the sLSTM block."""

from __future__ import annotations

import math

import pytest
import torch
from torch_threads import torch_threads

import blocks
from blocks import native
from blocks.registry import BlockError
from blocks.slstm import (
    SLSTMBlock,
    powerlaw_forget_bias,
    slstm_projections,
    slstm_recurrent_reference,
    slstm_scan,
)


def cell_inputs(B, S, NH, DH, dtype=torch.float64, i_scale=10.0, r_scale=0.5):
    """Random gate pre-activations with a wide input gate (exercises the stabiliser) and a
    random non-zero recurrent kernel."""
    H = NH * DH
    wx = torch.randn(B, S, 4 * H, dtype=dtype)
    wx[..., :H] = (torch.rand(B, S, H, dtype=dtype) * 2 - 1) * i_scale  # ĩ in [-i_scale, i_scale]
    wx[..., H : 2 * H] *= 3.0  # f̃: gates from nearly shut to nearly open
    R = r_scale * torch.randn(NH, DH, 4, DH, dtype=dtype)
    b = torch.randn(4 * H, dtype=dtype)
    return wx, R, b


def run_with_grads(fn, wx, R, b, num_heads, grad_out=None):
    leaves = [t.detach().clone().requires_grad_() for t in (wx, R, b)]
    y = fn(*leaves, num_heads)
    if grad_out is None:
        grad_out = torch.randn_like(y)
    y.backward(grad_out.to(y.dtype))
    return y.detach(), [t.grad for t in leaves], grad_out


def assert_close_rel(actual, expected, rel):
    """Max abs error, relative to the largest magnitude of the expected tensor."""
    scale = expected.abs().max().clamp_min(1e-12)
    err = (actual.to(expected.dtype) - expected).abs().max()
    assert err <= rel * scale, f"max error {err:.3e} > {rel:g} * {scale:.3e}"


def naive_unstabilised_cell(wx, R, b, num_heads):
    """Independent float64 check: the sLSTM without the stabiliser (C = sigma(f) C + e^i tanh z,
    N = sigma(f) N + e^i, y = sigma(o) C / N); fine while exp(ĩ) fits in float64."""
    B, S, _ = wx.shape
    NH, DH = R.shape[0], R.shape[1]
    W = torch.zeros(NH * DH, 4 * NH * DH, dtype=wx.dtype)  # block-diagonal as a dense matrix
    for h in range(NH):
        for g in range(4):
            rows = slice(h * DH, (h + 1) * DH)
            cols = slice(g * NH * DH + h * DH, g * NH * DH + (h + 1) * DH)
            W[rows, cols] = R[h, :, g, :]
    y = wx.new_zeros(B, NH * DH)
    C = wx.new_zeros(B, NH * DH)
    N = wx.new_zeros(B, NH * DH)
    ys = []
    for t in range(S):
        i, f, z, o = (wx[:, t] + y @ W + b).chunk(4, dim=-1)
        C = torch.sigmoid(f) * C + torch.exp(i) * torch.tanh(z)
        N = torch.sigmoid(f) * N + torch.exp(i)
        y = torch.sigmoid(o) * C / N
        ys.append(y)
    return torch.stack(ys, dim=1)


# ---------------------------------------------------------------------------------------------
# cell


def test_reference_cell_matches_unstabilised_equations():
    wx, R, b = cell_inputs(2, 12, 2, 3, i_scale=20.0)
    expected = naive_unstabilised_cell(wx, R, b, 2)
    torch.testing.assert_close(
        slstm_recurrent_reference(wx, R, b, 2), expected, rtol=1e-10, atol=1e-12
    )


@pytest.mark.parametrize("shape", [(3, 23, 2, 4), (2, 1, 1, 5), (1, 9, 4, 2)])
def test_slstm_scan_matches_step_by_step_recurrence_float64(shape):
    wx, R, b = cell_inputs(*shape)
    y_ref, g_ref, grad_out = run_with_grads(slstm_recurrent_reference, wx, R, b, shape[2])
    y, g, _ = run_with_grads(slstm_scan, wx, R, b, shape[2], grad_out)
    torch.testing.assert_close(y, y_ref, rtol=1e-10, atol=1e-12)
    for name, actual, expected in zip(("wx", "R", "b"), g, g_ref):
        torch.testing.assert_close(actual, expected, rtol=1e-9, atol=1e-10, msg=name)


needs_native = pytest.mark.skipif(native.compiler() is None, reason="no C compiler")


def _scan(impl):
    def scan(wx, R, b, num_heads):
        return slstm_scan(wx, R, b, num_heads, impl=impl)

    return scan


@needs_native
def test_native_slstm_kernel_builds_where_a_compiler_exists():
    from blocks.slstm import _native_library

    assert _native_library() is not None, native.status.get("slstm")


@pytest.mark.parametrize("shape", [(3, 32, 2, 8), (5, 17, 3, 5), (2, 1, 1, 16), (4, 9, 4, 32)])
def test_slstm_scan_matches_step_by_step_recurrence_float32(shape):
    wx, R, b = cell_inputs(*shape, dtype=torch.float64)
    # truth: the reference in float64; every float32 form must land within float32 rounding
    # (the native kernel's widths: a vector register's worth of units, less, and several)
    y_ref, g_ref, grad_out = run_with_grads(slstm_recurrent_reference, wx, R, b, shape[2])
    fns = [_scan("torch"), slstm_recurrent_reference]
    if not needs_native.args[0]:
        fns.append(_scan("native"))
    for fn in fns:
        y, g, _ = run_with_grads(fn, wx.float(), R.float(), b.float(), shape[2],
                                 grad_out.float())
        assert y.dtype == torch.float32 and all(t.dtype == torch.float32 for t in g)
        assert_close_rel(y, y_ref, 1e-5)
        for actual, expected in zip(g, g_ref):
            assert_close_rel(actual, expected, 3e-5)


@pytest.mark.parametrize("impl", ["torch", pytest.param("native", marks=needs_native)])
def test_slstm_scan_is_stable_where_unstabilised_exp_overflows_float32(impl):
    # ĩ up to ±150: exp(ĩ) overflows float32 (> 88.7) but not float64
    wx, R, b = cell_inputs(2, 30, 2, 4, i_scale=150.0, r_scale=0.3)
    expected = naive_unstabilised_cell(wx, R, b, 2)
    y, grads, _ = run_with_grads(_scan(impl), wx.float(), R.float(), b.float(), 2)
    assert torch.isfinite(y).all() and all(torch.isfinite(t).all() for t in grads)
    # float32 rounding of ĩ - m alone is ~1e-5 relative when |ĩ| ~ 150
    assert_close_rel(y, expected, 5e-5)


def test_slstm_scan_gradcheck_float64():
    wx, R, b = cell_inputs(2, 5, 2, 3, i_scale=3.0)
    leaves = [t.requires_grad_() for t in (wx, R, b)]
    assert torch.autograd.gradcheck(lambda w, r, bb: slstm_scan(w, r, bb, 2), leaves)


def test_slstm_scan_gradient_of_only_some_inputs():
    wx, R, b = cell_inputs(2, 7, 2, 3)
    _, g_ref, grad_out = run_with_grads(slstm_recurrent_reference, wx, R, b, 2)
    R_leaf = R.clone().requires_grad_()
    slstm_scan(wx, R_leaf, b, 2).backward(grad_out)
    torch.testing.assert_close(R_leaf.grad, g_ref[1], rtol=1e-9, atol=1e-10)


@needs_native
@pytest.mark.parametrize("threads", [1, 2, 3])
def test_native_slstm_scan_agrees_with_torch_scan(threads):
    # the lanes (head x batch element) split over threads; only R and b need gradients (the
    # kernel sums them per thread as it goes)
    wx, R, b = (t.float() for t in cell_inputs(5, 21, 3, 8, dtype=torch.float64))
    grad_out = torch.randn(5, 21, 24)
    R_ref, b_ref = R.clone().requires_grad_(), b.clone().requires_grad_()
    y_ref = slstm_scan(wx, R_ref, b_ref, 3, impl="torch")
    y_ref.backward(grad_out)
    R_leaf, b_leaf = R.clone().requires_grad_(), b.clone().requires_grad_()
    with torch_threads(threads):
        y = slstm_scan(wx, R_leaf, b_leaf, 3, impl="native")
        y.backward(grad_out)
    assert_close_rel(y, y_ref.detach(), 1e-5)
    assert_close_rel(R_leaf.grad, R_ref.grad, 3e-5)
    assert_close_rel(b_leaf.grad, b_ref.grad, 3e-5)


@needs_native
def test_native_slstm_scan_propagates_nan():
    wx, R, b = (t.float() for t in cell_inputs(2, 10, 2, 4, dtype=torch.float64))
    wx[1, 4, 3] = float("nan")  # the input gate of one unit of head 0, batch element 1
    y = slstm_scan(wx, R, b, 2, impl="native")
    assert torch.isfinite(y[0]).all() and torch.isfinite(y[1, :4]).all()
    assert torch.isnan(y[1, 4:]).any()


def test_slstm_scan_refuses_an_unknown_impl():
    wx, R, b = cell_inputs(1, 3, 2, 4)
    with pytest.raises(ValueError, match="impl must be"):
        slstm_scan(wx, R, b, 2, impl="cuda")


def test_slstm_scan_rejects_mismatched_shapes():
    wx, R, b = cell_inputs(1, 3, 2, 4)
    with pytest.raises(ValueError, match="R must be"):
        slstm_scan(wx, R, b, 3)
    with pytest.raises(ValueError, match="wx must be"):
        slstm_scan(wx[..., :-1], R, b, 2)


# ---------------------------------------------------------------------------------------------
# block


def ffn_width(d_model, factor=1.3):
    return 64 * math.ceil(factor * d_model / 64)


def expected_num_params(d_model, num_heads, conv_kernel, factor=1.3):
    dh = d_model // num_heads
    P = ffn_width(d_model, factor)
    return (
        d_model  # pre-norm of the sLSTM branch
        + (d_model * conv_kernel + d_model if conv_kernel else 0)  # depthwise conv with bias
        + 4 * num_heads * dh * dh  # headwise W_i, W_f, W_z, W_o
        + 4 * num_heads * dh * dh  # recurrent R, block-diagonal per head and gate
        + 4 * d_model  # gate biases
        + d_model  # group-norm weight
        + d_model  # pre-norm of the FFN
        + 3 * d_model * P  # FFN: [gate | up] and down, no biases
    )


@pytest.mark.parametrize("d_model,num_heads,conv_kernel", [(128, 4, 4), (96, 3, 2), (64, 2, 0)])
def test_block_parameter_count_matches_formula(d_model, num_heads, conv_kernel):
    blk = SLSTMBlock(d_model, 32, num_heads=num_heads, conv_kernel=conv_kernel)
    assert blk.num_params() == expected_num_params(d_model, num_heads, conv_kernel)
    assert sum(p.numel() for p in blk.parameters()) == blk.num_params()


def test_block_parameter_count_default_width():
    # d 128, 4 heads, conv 4: 12 * 128 + 8 * 128 * 32 + 3 * 128 * 192
    assert SLSTMBlock(128, 64).num_params() == 108_032


def test_block_output_shape_dtype_and_registry():
    assert "slstm" in blocks.names()
    blk = blocks.build("slstm", d_model=32, max_len=16, num_heads=2)
    assert isinstance(blk, SLSTMBlock)
    x = torch.randn(3, 16, 32)
    y = blk(x)
    assert y.shape == x.shape and y.dtype == torch.float32
    assert torch.isfinite(y).all()


def test_block_is_causal():
    blk = SLSTMBlock(32, 24, num_heads=4)
    with torch.no_grad():
        blk.R.normal_(0.0, 0.3)  # exercise memory mixing too
    x = torch.randn(2, 24, 32)
    y = blk(x)
    for t in (0, 7, 22):
        x2 = x.clone()
        x2[:, t + 1 :] = torch.randn_like(x2[:, t + 1 :]) * 3
        y2 = blk(x2)
        torch.testing.assert_close(y2[:, : t + 1], y[:, : t + 1], rtol=0, atol=1e-6)
        assert not torch.allclose(y2[:, t + 1 :], y[:, t + 1 :])


def test_block_gradients_finite_for_every_parameter():
    blk = SLSTMBlock(32, 20, block_index=1, num_blocks=3, num_heads=2)
    x = torch.randn(2, 20, 32, requires_grad=True)
    blk(x).square().mean().backward()
    for name, p in blk.named_parameters():
        assert p.grad is not None, name
        assert torch.isfinite(p.grad).all(), name
        assert p.grad.abs().sum() > 0, name
    assert torch.isfinite(x.grad).all()


def test_block_fast_path_matches_reference_cell(monkeypatch):
    blk = SLSTMBlock(24, 12, num_heads=3).double()
    with torch.no_grad():
        blk.R.normal_(0.0, 0.3)
    x = torch.randn(2, 12, 24, dtype=torch.float64)
    y = blk(x)
    assert y.dtype == torch.float64
    grads = torch.autograd.grad(y.sum(), list(blk.parameters()))
    import blocks.slstm as slstm_module

    monkeypatch.setattr(slstm_module, "slstm_scan", slstm_recurrent_reference)
    y_ref = blk(x)
    grads_ref = torch.autograd.grad(y_ref.sum(), list(blk.parameters()))
    torch.testing.assert_close(y, y_ref, rtol=1e-10, atol=1e-12)
    for g, g_ref in zip(grads, grads_ref):
        torch.testing.assert_close(g, g_ref, rtol=1e-8, atol=1e-10)


def test_block_state_size():
    blk = SLSTMBlock(64, 128, num_heads=4, conv_kernel=4)
    # c, n, m, y: d_model each; conv window: (kernel - 1) * d_model
    assert blk.state_size(128) == 4 * 64 + 3 * 64
    assert blk.state_size(4096) == blk.state_size(16)
    assert SLSTMBlock(64, 128, conv_kernel=0).state_size(128) == 4 * 64


def test_block_forget_bias_is_powerlaw_block_dependent():
    block_index, num_blocks, d_model, num_heads = 2, 5, 64, 2
    blk = SLSTMBlock(
        d_model, 16, block_index=block_index, num_blocks=num_blocks, num_heads=num_heads
    )
    dh = d_model // num_heads
    r = block_index / (num_blocks - 1)
    expected = torch.tensor([5 - 12 * (j / (dh - 1)) ** (0.3 + 1.3 * r) for j in range(dh)])
    bias = blk.b.detach()  # (gate, head, unit), gates i f z o
    for h in range(num_heads):
        torch.testing.assert_close(bias[1, h], expected, rtol=1e-6, atol=1e-6)
    assert bias[1, 0, 0] == pytest.approx(5.0) and bias[1, 0, -1] == pytest.approx(-7.0)
    assert (bias[[0, 2, 3]] == 0).all()
    # the first block of a stack uses r = 0, a single block too
    torch.testing.assert_close(
        powerlaw_forget_bias(dh, 0, 1), 5 - 12 * (torch.arange(dh) / (dh - 1)) ** 0.3
    )


def test_block_recurrent_kernel_starts_at_zero():
    blk = SLSTMBlock(32, 16, num_heads=4)
    assert blk.R.shape == (4, 8, 4, 8)
    assert (blk.R == 0).all()
    assert blk.R.requires_grad


@pytest.mark.parametrize(
    "options",
    [
        {"num_heads": 3},  # 32 not divisible by 3
        {"num_heads": 0},
        {"conv_kernel": -1},
        {"ffn_factor": 0.0},
        {"block_index": 4, "num_blocks": 4},
    ],
)
def test_block_rejects_bad_options(options):
    with pytest.raises(BlockError, match="slstm"):
        SLSTMBlock(32, 16, **options)


# ---------------------------------------------------------------------------------------------
# against the official xLSTM package (NX-AI's ``xlstm``, where installed: `make setup` installs it)


def _official_and_ours(d_model, seq_len, num_heads, conv_kernel, dtype):
    """The official sLSTMBlock (vanilla backend, CPU) with random weights everywhere, and our
    block of the same sizes holding the same weights (``_official_xlstm.copy_weights``)."""
    pytest.importorskip("xlstm")
    from mad_search.bench import _official_xlstm

    official = _official_xlstm.build(
        "slstm", d_model, seq_len, num_heads=num_heads, conv_kernel=conv_kernel
    ).to(dtype)
    assert official.xlstm.config.backend == "vanilla"
    ours = SLSTMBlock(d_model, seq_len, num_heads=num_heads, conv_kernel=conv_kernel).to(dtype)
    with torch.no_grad():
        for name, p in official.named_parameters():
            if p.dim() > 1:  # projections, recurrent kernel (non-zero: memory mixing), conv
                p.normal_(0.0, p.shape[-1] ** -0.5)
            else:  # wide gate biases: the stabiliser switches between ĩ and log f + m
                p.normal_(0.0, 2.0 if name.endswith("slstm_cell._bias_") else 0.5)
    _official_xlstm.copy_weights("slstm", official, ours)
    return official, ours, _official_xlstm.weight_map("slstm", official, ours)


def _outputs_and_grads(block, x, grad_out):
    x = x.clone().requires_grad_()
    y = block(x)
    y.backward(grad_out)
    return y.detach(), x.grad


@pytest.mark.parametrize("d_model,num_heads,conv_kernel", [(64, 4, 4), (48, 2, 0)])
def test_block_matches_the_official_xlstm_block_float64(d_model, num_heads, conv_kernel):
    """Same weights, same outputs and same gradients (input and every parameter) as NX-AI's
    sLSTMBlock, float64: agreement to rounding shows the equations are the same."""
    S = 29
    official, ours, pairs = _official_and_ours(d_model, S, num_heads, conv_kernel, torch.float64)
    x = torch.randn(3, S, d_model, dtype=torch.float64)
    grad_out = torch.randn_like(x)
    y_ref, dx_ref = _outputs_and_grads(official, x, grad_out)
    y, dx = _outputs_and_grads(ours, x, grad_out)
    torch.testing.assert_close(y - x, y_ref - x, rtol=1e-10, atol=1e-11)
    torch.testing.assert_close(dx, dx_ref, rtol=1e-10, atol=1e-11)
    for mine, theirs, convert in pairs:
        # convert is affine, so it maps a gradient as convert(g) - convert(0)
        expected = convert(theirs.grad) - convert(torch.zeros_like(theirs.grad))
        torch.testing.assert_close(mine.grad, expected, rtol=1e-9, atol=1e-10)


def test_block_matches_the_official_xlstm_block_float32():
    """The same in float32, the official block's configured dtype, to float32 rounding."""
    E, S = 64, 40
    official, ours, _ = _official_and_ours(E, S, 4, 4, torch.float32)
    x = torch.randn(2, S, E)
    grad_out = torch.randn_like(x)
    y_ref, dx_ref = _outputs_and_grads(official, x, grad_out)
    y, dx = _outputs_and_grads(ours, x, grad_out)
    assert_close_rel(y - x, y_ref - x, 1e-5)
    assert_close_rel(dx, dx_ref, 1e-5)


def test_official_input_and_forget_gate_modules_are_swapped():
    """The official sLSTMLayer feeds its module ``fgate`` to the input gate and ``igate`` to the
    forget gate; the weight map follows the computation, not the names, and the check above can
    tell the two apart."""
    official, ours, _ = _official_and_ours(32, 12, 2, 4, torch.float64)
    x = torch.randn(2, 12, 32, dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(ours(x), official(x), rtol=1e-10, atol=1e-11)
        assert torch.equal(ours.w_i, official.xlstm.fgate.weight)
        assert torch.equal(ours.w_f, official.xlstm.igate.weight)
        ours.w_i.copy_(official.xlstm.igate.weight)  # the mapping by name
        ours.w_f.copy_(official.xlstm.fgate.weight)
        assert not torch.allclose(ours(x), official(x), rtol=1e-3, atol=1e-3)


@needs_native
@pytest.mark.parametrize("threads", [1, 3])
@pytest.mark.parametrize("B, S, NH, DH", [(3, 11, 4, 8), (2, 5, 2, 16), (1, 7, 3, 24)])
def test_native_projections_match_torch(B, S, NH, DH, threads):
    D = NH * DH
    inputs = [torch.randn(B, S, D), torch.randn(B, S, D)] + [torch.randn(NH, DH, DH)
                                                             for _ in range(4)]
    dwx = torch.randn(S, NH, B, 4, DH)
    results = []
    before = torch.get_num_threads()
    for impl, dtype in (("torch", torch.float64), ("native", torch.float32)):
        leaves = [t.to(dtype).requires_grad_() for t in inputs]
        with torch_threads(threads if impl == "native" else before):
            y = slstm_projections(*leaves, impl=impl)
            grads = torch.autograd.grad(y, leaves, dwx.to(dtype))
        results.append([y.double()] + [g.double() for g in grads])
    for got, want in zip(results[1], results[0]):
        err = ((got - want).abs().max() / want.abs().max()).item()
        assert err < 2e-6, f"relative error {err:.2e}"


def test_projections_the_kernel_cannot_take_run_on_torch():
    x = torch.randn(2, 3, 10)
    ws = [torch.randn(2, 5, 5) for _ in range(4)]
    y = slstm_projections(x, x, *ws)  # heads of 5: torch's products
    assert y.shape == (3, 2, 2, 4, 5)
    with pytest.raises(RuntimeError, match="multiples of 8"):
        slstm_projections(x, x, *ws, impl="native")


@pytest.mark.parametrize("impl", ["torch", pytest.param("native", marks=needs_native)])
@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("S, NH, B, DH", [(7, 4, 3, 8), (5, 2, 2, 16), (3, 3, 2, 5)])
def test_group_norm_matches_layer_norm_per_head(impl, threads, S, NH, B, DH):
    # against F.layer_norm written out in float64: each (step, head, batch element) row of DH
    # units normalised, times its head's weights, then laid out as (B, S, NH DH)
    from blocks.slstm import slstm_group_norm

    y = 3.0 * torch.randn(S, NH, B, DH) + 1.0
    w = torch.randn(NH * DH)
    d_out = torch.randn(B, S, NH * DH)
    y64, w64 = y.double().requires_grad_(), w.double().requires_grad_()
    mu = y64.mean(-1, keepdim=True)
    var = ((y64 - mu) ** 2).mean(-1, keepdim=True)
    ref = ((y64 - mu) / torch.sqrt(var + 1e-5) * w64.view(NH, 1, DH)).permute(2, 0, 1, 3)
    ref = ref.reshape(B, S, NH * DH)
    grads_ref = torch.autograd.grad(ref, (y64, w64), d_out.double())
    y32, w32 = y.requires_grad_(), w.requires_grad_()
    with torch_threads(threads):
        out = slstm_group_norm(y32, w32, impl=impl)
        grads = torch.autograd.grad(out, (y32, w32), d_out)
    assert_close_rel(out, ref.detach().float(), 1e-5)
    for g, g_ref in zip(grads, grads_ref):
        assert_close_rel(g, g_ref.float(), 1e-4)
