"""RWKV-6 time mixing: the chunked wkv against the step-by-step recurrence; the block."""

import pytest
import torch

import blocks
from blocks.rwkv6 import wkv6_chunked, wkv6_recurrent_reference

D_MODEL, MAX_LEN = 32, 64


def _cell_inputs(seq, dtype, decay_scale=1.0):
    r = torch.randn(2, 3, seq, 4, dtype=dtype)
    k = torch.randn(2, 3, seq, 4, dtype=dtype)
    v = torch.randn(2, 3, seq, 5, dtype=dtype)
    log_w = -torch.rand(2, 3, seq, 4, dtype=dtype) * decay_scale
    u = torch.randn(3, 4, dtype=dtype)
    return [t.requires_grad_() for t in (r, k, v, log_w, u)]


def _compare(inputs, chunk, tol, factored=None):
    y = wkv6_chunked(*inputs, chunk=chunk, factored=factored)
    dy = torch.randn_like(y)
    grads = torch.autograd.grad(y, inputs, dy)
    y_ref = wkv6_recurrent_reference(*inputs)
    grads_ref = torch.autograd.grad(y_ref, inputs, dy)
    torch.testing.assert_close(y, y_ref, rtol=tol, atol=tol)
    for name, g, g_ref in zip(["r", "k", "v", "log_w", "u"], grads, grads_ref):
        assert torch.isfinite(g).all()
        torch.testing.assert_close(g, g_ref, rtol=tol, atol=tol * 10, msg=f"grad of {name}")


@pytest.mark.parametrize("factored", [None, False])  # None: factored here (mild decays)
@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-10), (torch.float32, 1e-4)])
@pytest.mark.parametrize("seq,chunk", [(37, 8), (64, 16), (5, 16), (23, 1)])
def test_chunked_wkv_matches_recurrence(dtype, tol, seq, chunk, factored):
    _compare(_cell_inputs(seq, dtype), chunk, tol, factored)


def test_chunked_wkv_is_stable_under_strong_decay():
    _compare(_cell_inputs(40, torch.float32, decay_scale=60.0), 16, 1e-4)


def _reference_block(blk, x):
    """The block spelled out: token shift by a loop over positions, recurrent wkv."""
    B, S, d = x.shape
    u = blk.norm(x)
    prev = torch.zeros_like(u)
    for t in range(1, S):
        prev[:, t] = u[:, t - 1]
    dx = prev - u
    lora = torch.tanh((u + dx * blk.time_maa_x) @ blk.time_maa_w1).view(B, S, 5, -1)
    mix = {name: lora[:, :, i] @ blk.time_maa_w2[i] for i, name in enumerate("wkvrg")}
    xs = {name: u + dx * (getattr(blk, f"time_maa_{name}") + mix[name]) for name in "wkvrg"}
    decay = blk.time_decay + torch.tanh(xs["w"] @ blk.time_decay_w1) @ blk.time_decay_w2

    def heads(t):
        return t.view(B, S, blk.num_heads, blk.head_dim).transpose(1, 2)

    y = wkv6_recurrent_reference(heads(blk.receptance(xs["r"])), heads(blk.key(xs["k"])),
                                 heads(blk.value(xs["v"])), heads(-decay.exp()), blk.time_faaaa)
    y = y.transpose(1, 2).reshape(B, S, blk.num_heads, blk.head_dim)
    mean = y.mean(-1, keepdim=True)
    var = y.var(-1, unbiased=False, keepdim=True)
    y = ((y - mean) / torch.sqrt(var + blk.ln_x.eps)).reshape(B, S, -1)
    y = y * blk.ln_x.weight + blk.ln_x.bias
    gate = blk.gate(xs["g"])
    return x + blk.output(y * gate * torch.sigmoid(gate))


@pytest.mark.parametrize("opts", [{}, {"head_dim": 8, "chunk_size": 5},
                                  {"dim_att": 64, "block_index": 2, "num_blocks": 3}])
def test_rwkv6_block_matches_reference(opts):
    blk = blocks.build("rwkv6", D_MODEL, MAX_LEN, **opts)
    with torch.no_grad():  # make the LoRAs matter (their init is +-1e-4)
        for p in (blk.time_maa_w1, blk.time_maa_w2, blk.time_decay_w1, blk.time_decay_w2):
            p.normal_(0, 0.2)
    x = torch.randn(2, 21, D_MODEL)
    with torch.no_grad():
        torch.testing.assert_close(blk(x), _reference_block(blk, x), rtol=1e-4, atol=1e-5)


def test_rwkv6_init_depends_on_depth_as_in_rwkv_lm():
    first = blocks.build("rwkv6", D_MODEL, MAX_LEN, block_index=0, num_blocks=4)
    last = blocks.build("rwkv6", D_MODEL, MAX_LEN, block_index=3, num_blocks=4)
    for blk, r01 in ((first, 0.0), (last, 1.0)):
        decay = blk.time_decay.flatten()
        torch.testing.assert_close(decay[[0, -1]], torch.tensor([-6.0, -1.0]))
        n = torch.arange(D_MODEL)
        expected_u = r01 * (1 - n / (D_MODEL - 1)) + ((n + 1) % 3 - 1) * 0.1
        torch.testing.assert_close(blk.time_faaaa.flatten(), expected_u.float())
    ddd = torch.arange(D_MODEL) / D_MODEL
    for blk, r10 in ((first, 1.0), (last, 0.25)):  # r10 = 1 - block_index / num_blocks
        torch.testing.assert_close(blk.time_maa_k.flatten(), 1 - ddd.pow(r10))
        torch.testing.assert_close(blk.time_maa_r.flatten(), 1 - ddd.pow(0.5 * r10))
    torch.testing.assert_close(last.time_maa_v.flatten(), 1 - (ddd.pow(0.25) + 0.3))


@pytest.mark.parametrize("opts", [{}, {"dim_att": 64, "head_dim": 8, "time_mix_extra_dim": 4}])
def test_rwkv6_parameter_count_and_state_size(opts):
    blk = blocks.build("rwkv6", D_MODEL, MAX_LEN, **opts)
    d, A = D_MODEL, opts.get("dim_att", D_MODEL)
    N, E1, E2 = opts.get("head_dim", 16), opts.get("time_mix_extra_dim", 32), 64
    expected = d + 6 * d + 2 * 5 * E1 * d + A + E2 * (d + A) + A + 4 * d * A + A * d + 2 * A
    assert blk.num_params() == expected
    assert blk.state_size(3) == blk.state_size(3000) == (A // N) * N * N + d


@pytest.mark.parametrize("bad", [{"head_dim": 5}, {"dim_att": 0}, {"chunk_size": 0},
                                 {"time_decay_extra_dim": 0}])
def test_rwkv6_rejects_bad_options(bad):
    with pytest.raises(blocks.BlockError, match="rwkv6"):
        blocks.build("rwkv6", D_MODEL, MAX_LEN, **bad)
