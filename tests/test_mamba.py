"""Mamba block: the fast two-level selective scan against the step-by-step recurrence."""

import math

import pytest
import torch
import torch.nn.functional as F

import blocks
from blocks.mamba import selective_scan, selective_scan_reference
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


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-10), (torch.float32, 2e-4)])
@pytest.mark.parametrize(
    "seq,chunk", [(37, 8), (64, None), (50, None), (13, 16), (7, 1), (1, None)]
)
def test_fast_scan_matches_step_by_step_reference(dtype, tol, seq, chunk):
    inputs = _scan_inputs(2, seq, 6, 5, dtype)
    dy = torch.randn(2, seq, 6, dtype=dtype)
    y, grads = _outputs_and_grads(selective_scan, inputs, dy, chunk=chunk)
    y_ref, grads_ref = _outputs_and_grads(selective_scan_reference, inputs, dy)
    assert y.dtype == dtype
    torch.testing.assert_close(y, y_ref, rtol=tol, atol=tol)
    for name, g, g_ref in zip("u delta A B C D".split(), grads, grads_ref):
        torch.testing.assert_close(g, g_ref, rtol=tol, atol=tol * 10, msg=f"grad of {name}")


def test_fast_scan_survives_decays_that_underflow():
    # exp(delta * A) underflows to 0 for most steps: products of decays only, so no inf or nan
    inputs = _scan_inputs(2, 40, 4, 3, torch.float32, delta_scale=60.0)
    dy = torch.randn(2, 40, 4)
    y, grads = _outputs_and_grads(selective_scan, inputs, dy, chunk=6)
    y_ref, grads_ref = _outputs_and_grads(selective_scan_reference, inputs, dy)
    torch.testing.assert_close(y, y_ref, rtol=1e-4, atol=1e-4)
    for g, g_ref in zip(grads, grads_ref):
        assert torch.isfinite(g).all()
        torch.testing.assert_close(g, g_ref, rtol=1e-4, atol=1e-3)


def test_fast_scan_keeps_graph_for_a_second_backward():
    inputs = _scan_inputs(1, 9, 3, 2, torch.float64)
    y = selective_scan(*inputs, chunk=4).square().sum()
    first = torch.autograd.grad(y, inputs, retain_graph=True)
    second = torch.autograd.grad(y, inputs)
    for a, b in zip(first, second):
        torch.testing.assert_close(a, b)


def test_causal_depthwise_conv_matches_nn_conv1d():
    conv = torch.nn.Conv1d(5, 5, 4, groups=5, padding=3)
    x = torch.randn(2, 11, 5)
    expected = conv(x.transpose(1, 2))[..., :11].transpose(1, 2)
    torch.testing.assert_close(causal_depthwise_conv(x, conv.weight, conv.bias), expected)


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
