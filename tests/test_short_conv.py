"""LFM2's gated short convolution against a one-step-at-a-time decoder with a rolling cache."""

import pytest
import torch

import blocks

D_MODEL, MAX_LEN = 32, 64


def _build(**kw):
    torch.manual_seed(torch.seed())  # fresh weights every run
    return blocks.build("short_conv", D_MODEL, MAX_LEN, **kw)


def _decode_step_by_step(blk, x):
    """Feed one position at a time, keeping only the last K - 1 gated inputs B*x as state."""
    Bsz, S, d = x.shape
    K = blk.kernel_size
    W_in, W_out = blk.in_proj.weight, blk.out_proj.weight
    w = blk.conv.weight[:, 0, :]  # (d, K); w[:, K - 1] multiplies the current position
    cache = torch.zeros(Bsz, d, K - 1)
    outs = []
    for t in range(S):
        u = torch.nn.functional.layer_norm(x[:, t], (d,), blk.norm.weight, None, blk.norm.eps)
        b, c, h = (u @ W_in.T).split(d, dim=-1)
        window = torch.cat([cache, (b * h)[..., None]], dim=-1)  # (B, d, K), oldest first
        conv = (window * w).sum(-1)
        outs.append(x[:, t] + (c * conv) @ W_out.T)
        cache = window[..., 1:]
        assert cache[0].numel() == blk.state_size(t + 1)
    return torch.stack(outs, dim=1)


@pytest.mark.parametrize("kernel_size", [1, 3, 4])
def test_short_conv_matches_step_by_step_decoding(kernel_size):
    blk = _build(kernel_size=kernel_size).eval()
    x = torch.randn(2, int(torch.randint(5, 30, ()).item()), D_MODEL)
    with torch.no_grad():
        torch.testing.assert_close(blk(x), _decode_step_by_step(blk, x), rtol=1e-5, atol=1e-5)


def test_short_conv_sees_exactly_kernel_size_positions():
    blk = _build(kernel_size=3).eval()
    x = torch.randn(1, 12, D_MODEL)
    x2 = x.clone()
    x2[:, 4] += torch.randn(D_MODEL)  # position 4 reaches outputs 4, 5, 6 only
    with torch.no_grad():
        delta = (blk(x2) - blk(x)).abs().amax(-1)[0]
    assert (delta[:4] == 0).all() and (delta[7:] == 0).all()
    assert (delta[4:7] > 0).all()


def test_short_conv_parameter_count_and_no_biases():
    K = 3
    blk = _build(kernel_size=K)
    d = D_MODEL
    assert blk.num_params() == d + 3 * d * d + d * K + d * d  # norm, in_proj, conv, out_proj
    assert all(not name.endswith("bias") for name, _ in blk.named_parameters())


@pytest.mark.parametrize("K", [1, 3, 5])
def test_short_conv_state_size_is_conv_window(K):
    blk = _build(kernel_size=K)
    for L in (1, 16, 1000):
        assert blk.state_size(L) == (K - 1) * D_MODEL


@pytest.mark.parametrize("bad", [{"kernel_size": 0}, {"kernel_size": 2.0}, {"kernel_size": True},
                                 {"bias": True}])
def test_short_conv_rejects_bad_options(bad):
    with pytest.raises(blocks.BlockError):
        blocks.build("short_conv", D_MODEL, MAX_LEN, **bad)
