"""Mamba block: the fast selective scans (the C kernel and the two-level scan of torch
operators) against the step-by-step recurrence."""

import math
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from torch_threads import torch_threads

import blocks
from blocks import native
from blocks.mamba import (
    gated_selective_scan,
    native_available,
    selective_scan,
    selective_scan_reference,
)
from blocks.ops import causal_depthwise_conv

D_MODEL, MAX_LEN = 32, 64


def _scan_inputs(batch, seq, d_inner, d_state, dtype, delta_scale=1.0):
    u = torch.randn(batch, seq, d_inner, dtype=dtype)
    delta = F.softplus(torch.randn(batch, seq, d_inner, dtype=dtype)) * delta_scale
    A = -torch.rand(d_inner, d_state, dtype=dtype) * 4 - 0.1
    B = torch.randn(batch, seq, d_state, dtype=dtype)
    C = torch.randn(batch, seq, d_state, dtype=dtype)
    D = torch.randn(d_inner, dtype=dtype)
    return [t.requires_grad_() for t in (u, delta, A, B, C, D)]


def _outputs_and_grads(fn, inputs, dy, **kw):
    y = fn(*inputs, **kw)
    return y, torch.autograd.grad(y, inputs, dy)


needs_native = pytest.mark.skipif(native.compiler() is None, reason="no C compiler")


@needs_native
def test_native_kernel_builds_where_a_compiler_exists():
    assert native_available(), native.status.get("selective_scan")


@pytest.mark.parametrize("dtype,tol,impl", [
    (torch.float64, 1e-10, "torch"), (torch.float32, 2e-4, "torch"),
    pytest.param(torch.float32, 2e-4, "native", marks=needs_native)])
@pytest.mark.parametrize(
    "seq,chunk", [(37, 8), (64, None), (50, None), (13, 16), (7, 1), (1, None)]
)
def test_fast_scan_matches_step_by_step_reference(dtype, tol, impl, seq, chunk):
    inputs = _scan_inputs(2, seq, 6, 5, dtype)
    dy = torch.randn(2, seq, 6, dtype=dtype)
    y, grads = _outputs_and_grads(selective_scan, inputs, dy, chunk=chunk, impl=impl)
    y_ref, grads_ref = _outputs_and_grads(selective_scan_reference, inputs, dy)
    assert y.dtype == dtype
    torch.testing.assert_close(y, y_ref, rtol=tol, atol=tol)
    for name, g, g_ref in zip("u delta A B C D".split(), grads, grads_ref):
        torch.testing.assert_close(g, g_ref, rtol=tol, atol=tol * 10, msg=f"grad of {name}")


@pytest.mark.parametrize("impl", ["torch", pytest.param("native", marks=needs_native)])
def test_fast_scan_survives_decays_that_underflow(impl):
    # exp(delta * A) underflows to 0 for most steps: products of decays only, so no inf or nan
    inputs = _scan_inputs(2, 40, 4, 3, torch.float32, delta_scale=60.0)
    dy = torch.randn(2, 40, 4)
    y, grads = _outputs_and_grads(selective_scan, inputs, dy, chunk=6, impl=impl)
    y_ref, grads_ref = _outputs_and_grads(selective_scan_reference, inputs, dy)
    torch.testing.assert_close(y, y_ref, rtol=1e-4, atol=1e-4)
    for g, g_ref in zip(grads, grads_ref):
        assert torch.isfinite(g).all()
        torch.testing.assert_close(g, g_ref, rtol=1e-4, atol=1e-3)


@pytest.mark.parametrize("dtype", [torch.float64, pytest.param(torch.float32, marks=needs_native)])
def test_fast_scan_keeps_graph_for_a_second_backward(dtype):
    inputs = _scan_inputs(1, 9, 3, 2, dtype)
    y = selective_scan(*inputs, chunk=4).square().sum()
    first = torch.autograd.grad(y, inputs, retain_graph=True)
    second = torch.autograd.grad(y, inputs)
    for a, b in zip(first, second):
        torch.testing.assert_close(a, b)


@needs_native
@pytest.mark.parametrize("threads", [1, 2, 3])
def test_native_scan_agrees_with_torch_scan_at_block_sizes(threads):
    # realistic widths (the vectorised loops' main body and remainder), the batch split over
    # threads, every gradient; the torch scan in float64 is the yardstick
    batch, seq, d_inner, d_state = 5, 70, 37, 16
    inputs = _scan_inputs(batch, seq, d_inner, d_state, torch.float32)
    dy = torch.randn(batch, seq, d_inner)
    with torch_threads(threads):
        y, grads = _outputs_and_grads(selective_scan, inputs, dy, impl="native")
    wide = [t.detach().double().requires_grad_() for t in inputs]
    y_ref, grads_ref = _outputs_and_grads(selective_scan, wide, dy.double(), impl="torch")
    torch.testing.assert_close(y, y_ref.float(), rtol=1e-4, atol=1e-4)
    for name, g, g_ref in zip("u delta A B C D".split(), grads, grads_ref):
        torch.testing.assert_close(g, g_ref.float(), rtol=1e-4, atol=1e-3, msg=f"grad of {name}")


@needs_native
def test_native_scan_propagates_nan():
    # a diverging run must show up as a non-finite loss, not be clamped into finite numbers
    u, delta, A, B, C, D = _scan_inputs(2, 12, 8, 4, torch.float32)
    with torch.no_grad():
        delta[1, 5, 3] = float("nan")
    y = selective_scan(u, delta, A, B, C, D, impl="native")
    assert torch.isfinite(y[0]).all() and torch.isfinite(y[1, :5]).all()
    assert torch.isnan(y[1, 5:, 3]).all()
    grads = torch.autograd.grad(y[0].sum(), (u, delta, A))
    assert torch.isfinite(grads[0][0]).all()


def _gated_inputs(batch, seq, d_inner, d_state, dt_rank=3, draw_shift=-1.0):
    """The fused scan's arguments as the block makes them: B and C column slices of one
    x_proj output, z the second half of one in_proj output (strided views, not copies)."""
    u = torch.randn(batch, seq, d_inner)
    draw = torch.randn(batch, seq, d_inner) * 2 + draw_shift
    A = -torch.rand(d_inner, d_state) * 4 - 0.1
    xdbl = torch.randn(batch, seq, dt_rank + 2 * d_state)
    B, C = xdbl[..., dt_rank:dt_rank + d_state], xdbl[..., dt_rank + d_state:]
    D = torch.randn(d_inner)
    z = torch.randn(batch, seq, 2 * d_inner)[..., d_inner:]
    return [u, draw, A, B, C, D, z]


def _gated_reference(u, draw, A, B, C, D, z):
    return selective_scan_reference(u, F.softplus(draw), A, B, C, D) * F.silu(z)


@needs_native
@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("batch,seq,d_inner,d_state", [
    (3, 37, 16, 5), (2, 64, 24, 16), (1, 1, 8, 1), (5, 9, 8, 3)])
def test_fused_gated_scan_matches_float64_reference(threads, batch, seq, d_inner, d_state):
    # softplus, scan, D skip and SiLU gate in one kernel, strided B, C and z, the batch split
    # over threads: every output and gradient against the step-by-step loop in float64
    inputs = _gated_inputs(batch, seq, d_inner, d_state)
    assert batch * seq == 1 or not (inputs[3].is_contiguous() or inputs[6].is_contiguous())
    leaves = [t.clone().requires_grad_() for t in inputs]
    dy = torch.randn(batch, seq, d_inner)
    with torch_threads(threads):
        y, grads = _outputs_and_grads(gated_selective_scan, leaves, dy, impl="native")
    wide = [t.double().requires_grad_() for t in inputs]
    y_ref, grads_ref = _outputs_and_grads(_gated_reference, wide, dy.double())
    torch.testing.assert_close(y, y_ref.float(), rtol=1e-4, atol=1e-4)
    for name, g, g_ref in zip("u draw A B C D z".split(), grads, grads_ref):
        torch.testing.assert_close(g, g_ref.float(), rtol=1e-4, atol=1e-3, msg=f"grad of {name}")


@pytest.mark.parametrize("impl", ["torch", pytest.param("native", marks=needs_native)])
def test_gated_scan_paths_agree_with_large_and_small_deltas(impl):
    # draw far on both sides of 0 (softplus ~ x and ~ exp(x)); decays that underflow
    inputs = _gated_inputs(2, 30, 16, 4, draw_shift=0.0)
    with torch.no_grad():
        inputs[1].mul_(15.0)
    leaves = [t.clone().requires_grad_() for t in inputs]
    dy = torch.randn(2, 30, 16)
    y, grads = _outputs_and_grads(gated_selective_scan, leaves, dy, impl=impl)
    wide = [t.double().requires_grad_() for t in inputs]
    y_ref, grads_ref = _outputs_and_grads(_gated_reference, wide, dy.double())
    torch.testing.assert_close(y, y_ref.float(), rtol=1e-4, atol=1e-4)
    for g, g_ref in zip(grads, grads_ref):
        assert torch.isfinite(g).all()
        torch.testing.assert_close(g, g_ref.float(), rtol=1e-4, atol=1e-3)


@needs_native
def test_gated_scan_auto_falls_back_where_the_fused_kernel_cannot_run():
    # d_inner not a multiple of 8: auto takes softplus + the plain native scan + the gate;
    # native names why it cannot
    inputs = _gated_inputs(2, 11, 6, 3)
    y = gated_selective_scan(*inputs)
    torch.testing.assert_close(y, _gated_reference(*inputs), rtol=1e-4, atol=1e-4)
    with pytest.raises(RuntimeError, match="multiple of 8, got 6"):
        gated_selective_scan(*inputs, impl="native")


@needs_native
@pytest.mark.parametrize("fused", [True, False])
def test_native_scans_flush_denormals_inside_the_kernel_only(fused):
    # decays exp(delta A) down to ~1e-38 (delta ~ 5-6 against A = -16): the kernels flush
    # denormal floats to zero while they run (x86 takes a ~100-cycle assist per denormal), so
    # results differ from float64 by less than 1.2e-38 per term, and the calling thread's
    # floating-point mode is left as it was
    tiny = 1e-40
    assert torch.tensor([tiny]).item() != 0.0                 # denormals are on out here
    batch, seq, d_inner, d_state = 2, 48, 16, 16
    inputs = _gated_inputs(batch, seq, d_inner, d_state, draw_shift=0.0)
    with torch.no_grad():
        inputs[1].copy_(torch.rand(batch, seq, d_inner) * 2 + 4.5)   # softplus ~ 4.5 .. 6.5
        inputs[2].copy_(-torch.arange(1, d_state + 1.0).expand(d_inner, d_state))
    fn = gated_selective_scan if fused else (
        lambda u, draw, A, B, C, D, z, impl: selective_scan(u, F.softplus(draw), A, B, C, D,
                                                            impl=impl) * F.silu(z))
    leaves = [t.clone().requires_grad_() for t in inputs]
    dy = torch.randn(batch, seq, d_inner)
    with torch_threads(1):                                    # the kernel on this thread
        y, grads = _outputs_and_grads(fn, leaves, dy, impl="native")
    assert (torch.tensor([tiny]) * 1.5).item() != 0.0         # mode restored after the call
    wide = [t.double().requires_grad_() for t in inputs]
    y_ref, grads_ref = _outputs_and_grads(_gated_reference, wide, dy.double())
    torch.testing.assert_close(y, y_ref.float(), rtol=1e-4, atol=1e-4)
    for name, g, g_ref in zip("u draw A B C D z".split(), grads, grads_ref):
        torch.testing.assert_close(g, g_ref.float(), rtol=1e-4, atol=1e-3, msg=f"grad of {name}")
    # a denormal input is read as zero inside the kernel: y = C softplus(0) u B, D = 0
    u, z = torch.full((1, 1, 8), tiny), torch.full((1, 1, 8), 20.0)   # SiLU(20) ~ 20
    args = (u, torch.zeros(1, 1, 8), -torch.ones(8, 1), torch.ones(1, 1, 1),
            torch.ones(1, 1, 1), torch.zeros(8), z)
    assert (fn(*args, impl="torch") != 0).all()               # torch keeps the denormal
    assert (fn(*args, impl="native") == 0).all()


@needs_native
def test_fused_gated_scan_propagates_nan():
    u, draw, A, B, C, D, z = _gated_inputs(2, 12, 8, 4)
    draw[1, 5, 3] = float("nan")
    y = gated_selective_scan(u, draw, A, B, C, D, z, impl="native")
    assert torch.isfinite(y[0]).all() and torch.isfinite(y[1, :5]).all()
    assert torch.isnan(y[1, 5:, 3]).all()


def test_selective_scan_refuses_an_unknown_impl():
    with pytest.raises(ValueError, match="impl must be"):
        selective_scan(*_scan_inputs(1, 3, 2, 2, torch.float32), impl="cuda")


def _native_status_in_a_fresh_process(tmp_path, **env):
    code = ("import torch, blocks.mamba as m, blocks.native as n; "
            "x = torch.randn(1, 4, 3); "
            "y = m.selective_scan(x, x.exp(), -torch.ones(3, 2), torch.randn(1, 4, 2), "
            "torch.randn(1, 4, 2)); print('STATUS', n.status.get('selective_scan'))")
    full_env = {**os.environ, "MAD_SEARCH_CACHE": str(tmp_path), **env}
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          env=full_env, timeout=120)


@needs_native
def test_native_conv_kernel_builds_and_splits_the_batch_over_threads():
    from blocks.ops import _native_conv_library

    assert _native_conv_library() is not None, native.status.get("causal_conv")
    x, w, b = torch.randn(5, 13, 24), torch.randn(24, 1, 4), torch.randn(24)
    dy = torch.randn(5, 13, 24)
    results = []
    for threads in (1, 3):
        with torch_threads(threads):
            leaves = [t.clone().requires_grad_() for t in (x, w, b)]
            y = causal_depthwise_conv(*leaves, impl="native")
            results.append((y, *torch.autograd.grad(y, leaves, dy)))
    for one, three in zip(*results):
        torch.testing.assert_close(one, three, rtol=1e-5, atol=1e-5)


def test_native_off_switch_and_failed_build_fall_back_to_torch(tmp_path):
    off = _native_status_in_a_fresh_process(tmp_path, MAD_SEARCH_NATIVE="0")
    assert off.returncode == 0, off.stderr
    assert "STATUS torch: MAD_SEARCH_NATIVE=0" in off.stdout and off.stderr == ""
    broken = _native_status_in_a_fresh_process(tmp_path, CC="false")
    assert broken.returncode == 0, broken.stderr
    assert "STATUS torch: building it failed" in broken.stdout
    lines = [ln for ln in broken.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and "native selective_scan kernel unavailable" in lines[0]


@pytest.mark.parametrize("impl", ["torch", pytest.param("native", marks=needs_native)])
@pytest.mark.parametrize("activation", [None, "silu"])
@pytest.mark.parametrize("channels,kernel,seq,bias", [
    (5, 4, 11, True), (64, 4, 47, True), (16, 4, 2, False), (24, 2, 9, True), (8, 1, 5, False),
    (12, 3, 10, True), (8, 20, 23, True), (256, 4, 40, True)])
def test_causal_depthwise_conv_matches_nn_conv1d(impl, activation, channels, kernel, seq, bias):
    # outputs and every gradient against nn.Conv1d (then F.silu) in float64: sequences shorter
    # than the kernel, channels past a multiple of eight (12) and a kernel longer than the C
    # kernel keeps in registers (20) and a sequence in several tiles of rows (256 channels: 16
    # rows a tile) included
    conv = torch.nn.Conv1d(channels, channels, kernel, groups=channels, padding=kernel - 1,
                           bias=bias)
    x = torch.randn(3, seq, channels, requires_grad=True)
    dy = torch.randn(3, seq, channels)
    params = [conv.weight] + ([conv.bias] if bias else [])
    y = causal_depthwise_conv(x, conv.weight, conv.bias, impl=impl, activation=activation)
    grads = torch.autograd.grad(y, [x, *params], dy)
    conv64 = conv.double()
    x64 = x.detach().double().requires_grad_()
    expected = conv64(x64.transpose(1, 2))[..., :seq].transpose(1, 2)
    if activation == "silu":
        expected = torch.nn.functional.silu(expected)
    grads_ref = torch.autograd.grad(expected, [x64, *params], dy.double())
    torch.testing.assert_close(y, expected.float(), rtol=1e-5, atol=1e-5)
    for g, g_ref in zip(grads, grads_ref):
        torch.testing.assert_close(g, g_ref.float(), rtol=1e-4, atol=1e-4)


def _reference_block(blk, x):
    """The block spelled out with nn.Conv1d and the step-by-step scan."""
    u = blk.norm(x)
    xs, z = blk.in_proj(u).chunk(2, dim=-1)
    xs = F.silu(blk.conv1d(xs.transpose(1, 2))[..., : x.shape[1]].transpose(1, 2))
    dt, B, C = blk.x_proj(xs).split([blk.dt_rank, blk.d_state, blk.d_state], dim=-1)
    delta = F.softplus(blk.dt_proj(dt))
    y = selective_scan_reference(xs, delta, -torch.exp(blk.A_log), B, C, blk.D)
    return x + blk.out_proj(y * F.silu(z))


@pytest.mark.parametrize("opts", [{}, {"d_state": 4, "chunk_size": 5}, {"expand": 1, "d_conv": 2}])
def test_mamba_block_matches_reference(opts):
    blk = blocks.build("mamba", D_MODEL, MAX_LEN, **opts)
    x = torch.randn(2, 23, D_MODEL)
    with torch.no_grad():
        torch.testing.assert_close(blk(x), _reference_block(blk, x), rtol=1e-4, atol=1e-5)


def test_mamba_init_follows_mamba_simple():
    blk = blocks.build("mamba", D_MODEL, MAX_LEN, dt_min=0.01, dt_max=0.05)
    E, N = 2 * D_MODEL, 16
    assert blk.dt_rank == math.ceil(D_MODEL / 16)
    torch.testing.assert_close(blk.A_log, torch.log(torch.arange(1.0, N + 1)).repeat(E, 1))
    torch.testing.assert_close(blk.D, torch.ones(E))
    dt = F.softplus(blk.dt_proj.bias)
    assert dt.min() >= 0.01 * (1 - 1e-4) and dt.max() <= 0.05 * (1 + 1e-4)
    bound = blk.dt_rank**-0.5
    assert blk.dt_proj.weight.abs().max() <= bound


@pytest.mark.parametrize("opts", [{}, {"bias": True, "conv_bias": False, "dt_rank": 3}])
def test_mamba_parameter_count_and_state_size(opts):
    blk = blocks.build("mamba", D_MODEL, MAX_LEN, **opts)
    d, E, N, K = D_MODEL, 2 * D_MODEL, 16, 4
    R = opts.get("dt_rank", math.ceil(d / 16))
    bias = opts.get("bias", False)
    conv_bias = opts.get("conv_bias", True)
    expected = d  # norm
    expected += d * 2 * E + (2 * E if bias else 0)  # in_proj
    expected += E * K + (E if conv_bias else 0)  # depthwise conv
    expected += E * (R + 2 * N) + R * E + E  # x_proj, dt_proj
    expected += E * N + E  # A_log, D
    expected += E * d + (d if bias else 0)  # out_proj
    assert blk.num_params() == expected
    assert blk.state_size(10) == blk.state_size(1000) == E * N + (K - 1) * E


@pytest.mark.parametrize("bad", [
    {"d_state": 0}, {"d_conv": 0}, {"expand": 0}, {"dt_rank": "big"}, {"dt_min": 0.2},
    {"chunk_size": 0},
])
def test_mamba_rejects_bad_options(bad):
    with pytest.raises(blocks.BlockError, match="mamba"):
        blocks.build("mamba", D_MODEL, MAX_LEN, **bad)


def test_native_scan_refuses_float64_in_one_line():
    with pytest.raises(RuntimeError, match="not float32 on the CPU"):
        selective_scan(*_scan_inputs(1, 3, 2, 2, torch.float64), impl="native")


def test_causal_depthwise_conv_refuses_an_unknown_activation():
    x, w = torch.randn(1, 3, 8), torch.randn(8, 1, 4)
    with pytest.raises(ValueError, match="activation must be None or 'silu'"):
        causal_depthwise_conv(x, w, activation="relu")
