"""Gated linear attention: the chunked form against the step-by-step recurrence."""

import pytest
import torch
import torch.nn.functional as F

import blocks
from blocks.gated_linear_attention import gla_chunked, gla_recurrent_reference

D_MODEL, MAX_LEN = 32, 64


def _cell_inputs(seq, dtype, gate_scale=1.0, dk=4, dv=5):
    q = torch.randn(2, 3, seq, dk, dtype=dtype)
    k = torch.randn(2, 3, seq, dk, dtype=dtype)
    v = torch.randn(2, 3, seq, dv, dtype=dtype)
    log_alpha = F.logsigmoid(torch.randn(2, 3, seq, dk, dtype=dtype) * gate_scale) / 16
    return [t.requires_grad_() for t in (q, k, v, log_alpha)]


@pytest.mark.parametrize("factored", [None, False])  # None: factored here (mild decays)
@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-10), (torch.float32, 1e-4)])
@pytest.mark.parametrize("seq,chunk", [(37, 8), (64, 16), (5, 16), (23, 1)])
def test_chunked_gla_matches_recurrence(dtype, tol, seq, chunk, factored):
    inputs = _cell_inputs(seq, dtype)
    y = gla_chunked(*inputs, chunk=chunk, factored=factored)
    dy = torch.randn_like(y)
    grads = torch.autograd.grad(y, inputs, dy)
    y_ref = gla_recurrent_reference(*inputs)
    grads_ref = torch.autograd.grad(y_ref, inputs, dy)
    torch.testing.assert_close(y, y_ref, rtol=tol, atol=tol)
    for name, g, g_ref in zip(["q", "k", "v", "log_alpha"], grads, grads_ref):
        torch.testing.assert_close(g, g_ref, rtol=tol, atol=tol * 10, msg=f"grad of {name}")


def test_chunked_gla_is_stable_under_strong_decay():
    # log decays down to -60 per step: a factorised exp(b_t) exp(-b_s) form would overflow
    inputs = _cell_inputs(40, torch.float32)
    with torch.no_grad():
        inputs[3].copy_(-60 * torch.rand_like(inputs[3]))
    y = gla_chunked(*inputs, chunk=16)
    dy = torch.randn_like(y)
    grads = torch.autograd.grad(y, inputs, dy)
    y_ref = gla_recurrent_reference(*inputs)
    grads_ref = torch.autograd.grad(y_ref, inputs, dy)
    torch.testing.assert_close(y, y_ref, rtol=1e-4, atol=1e-4)
    for g, g_ref in zip(grads, grads_ref):
        assert torch.isfinite(g).all()
        torch.testing.assert_close(g, g_ref, rtol=1e-4, atol=1e-3)


def _reference_block(blk, x):
    """The block spelled out: recurrent cell, RMSNorm per head, swish output gate."""
    B, S, _ = x.shape
    H, dk, dv = blk.num_heads, blk.head_k_dim, blk.head_v_dim
    u = blk.norm(x)

    def heads(t, d):
        return t.view(B, S, H, d).transpose(1, 2)

    q, k, v = heads(blk.q_proj(u), dk), heads(blk.k_proj(u), dk), heads(blk.v_proj(u), dv)
    alpha = torch.sigmoid(blk.gk_proj(u)) ** (1 / blk.gate_logit_normalizer)
    o = gla_recurrent_reference(q, k, v, heads(alpha.log(), dk)).transpose(1, 2)
    o = o / torch.sqrt(o.pow(2).mean(-1, keepdim=True) + blk.norm_eps) * blk.g_norm_weight
    o = o.reshape(B, S, H * dv) * (blk.g_proj(u) * torch.sigmoid(blk.g_proj(u)))
    return x + blk.o_proj(o)


@pytest.mark.parametrize("opts", [{}, {"num_heads": 2, "chunk_size": 5}, {"expand_v": 2.0}])
def test_gla_block_matches_reference(opts):
    blk = blocks.build("gated_linear_attention", D_MODEL, MAX_LEN, **opts)
    x = torch.randn(2, 21, D_MODEL)
    with torch.no_grad():
        torch.testing.assert_close(blk(x), _reference_block(blk, x), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("opts", [{}, {"num_heads": 4, "expand_k": 0.5, "gate_low_rank_dim": 8}])
def test_gla_parameter_count_and_state_size(opts):
    blk = blocks.build("gated_linear_attention", D_MODEL, MAX_LEN, **opts)
    d, H = D_MODEL, opts.get("num_heads", 8)
    K, V, r = int(d * opts.get("expand_k", 1.0)), d, opts.get("gate_low_rank_dim", 16)
    expected = d + 2 * d * K + 2 * d * V + d * r + r * K + K + V * d + V // H
    assert blk.num_params() == expected
    assert blk.state_size(7) == blk.state_size(700) == H * (K // H) * (V // H)


@pytest.mark.parametrize("bad", [
    {"num_heads": 5}, {"expand_k": 0.0}, {"gate_low_rank_dim": 0}, {"chunk_size": 0},
])
def test_gla_rejects_bad_options(bad):
    with pytest.raises(blocks.BlockError, match="gated_linear_attention"):
        blocks.build("gated_linear_attention", D_MODEL, MAX_LEN, **bad)
