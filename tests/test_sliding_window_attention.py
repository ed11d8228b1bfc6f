"""Sliding-window attention against attention restricted to the window by an explicit loop."""

import math

import pytest
import torch

import blocks
from blocks.attention import AttentionBlock

D_MODEL, MAX_LEN = 32, 64


def _build(**kw):
    torch.manual_seed(torch.seed())  # fresh weights every run
    return blocks.build("sliding_window_attention", D_MODEL, MAX_LEN, **kw)


def _rotate(t, pos, base):
    """RoPE on (..., hd) at position pos: pair (i, i + hd/2) turns by pos * base^(-2i/hd)."""
    hd = t.shape[-1]
    half = hd // 2
    angle = torch.tensor([pos * base ** (-2 * i / hd) for i in range(half)])
    c, s = angle.cos(), angle.sin()
    a, b = t[..., :half], t[..., half:]
    return torch.cat([a * c - b * s, a * s + b * c], dim=-1)


def _windowed_reference(blk, x):
    """Query t attends to keys t - window + 1 ... t; softmax over exactly those, head by head."""
    B, S, D = x.shape
    H, KV, hd, W = blk.num_heads, blk.num_kv_heads, blk.head_dim, blk.window
    u = torch.nn.functional.layer_norm(x, (D,), blk.norm.weight, None, blk.norm.eps)
    q, k, v = (u @ blk.qkv.weight.T).split([D, KV * hd, KV * hd], dim=-1)
    q, k, v = q.view(B, S, H, hd), k.view(B, S, KV, hd), v.view(B, S, KV, hd)
    if blk.position == "rope":
        q = torch.stack([_rotate(q[:, t], t, blk.rope_base) for t in range(S)], dim=1)
        k = torch.stack([_rotate(k[:, t], t, blk.rope_base) for t in range(S)], dim=1)
    out = torch.zeros(B, S, H, hd)
    for t in range(S):
        keys = torch.tensor([s for s in range(S) if 0 <= t - s < W])
        for h in range(H):
            g = h // (H // KV)
            scores = (q[:, t, h, None, :] * k[:, keys, g]).sum(-1) / math.sqrt(hd)
            out[:, t, h] = (scores.softmax(-1)[..., None] * v[:, keys, g]).sum(1)
    return x + out.reshape(B, S, D) @ blk.out.weight.T


def test_default_window_is_mad_labs():
    blk = _build()
    assert isinstance(blk, AttentionBlock)
    assert blk.window == 33  # flash-attn window_size=(32, 32), causal: 32 back plus itself


@pytest.mark.parametrize("opts", [
    {},
    {"window": 4},
    {"window": 7, "num_kv_heads": 2},
    {"window": 3, "position": "none", "num_heads": 2},
])
def test_sliding_window_attention_matches_windowed_loop(opts):
    blk = _build(**opts).eval()
    S = int(torch.randint(blk.window + 2, MAX_LEN, ()).item())  # longer than the window
    x = torch.randn(2, S, D_MODEL)
    with torch.no_grad():
        torch.testing.assert_close(blk(x), _windowed_reference(blk, x), rtol=1e-4, atol=1e-5)


def test_window_longer_than_sequence_is_full_attention():
    swa = _build(window=16).eval()
    full = blocks.build("attention", D_MODEL, MAX_LEN).eval()
    full.load_state_dict(swa.state_dict())
    x = torch.randn(2, 12, D_MODEL)
    with torch.no_grad():
        torch.testing.assert_close(swa(x), full(x))
        x = torch.randn(2, 24, D_MODEL)
        assert not torch.allclose(swa(x)[:, 16:], full(x)[:, 16:])


def test_sliding_window_parameter_count_and_state_size():
    blk = _build(window=8, num_kv_heads=2)
    hd = D_MODEL // 4
    assert blk.num_params() == D_MODEL + D_MODEL * (D_MODEL + 2 * 2 * hd) + D_MODEL * D_MODEL
    assert blk.state_size(5) == 2 * 2 * hd * 5
    assert blk.state_size(1000) == 2 * 2 * hd * 8
    assert _build().state_size(1000) == 2 * D_MODEL * 33


@pytest.mark.parametrize("bad", [
    {"window": 0}, {"window": -3}, {"window": None}, {"window": 2.5}, {"num_heads": 5},
    {"position": "alibi"}, {"dropout": 0.1},
])
def test_sliding_window_attention_rejects_bad_options(bad):
    with pytest.raises(blocks.BlockError):
        blocks.build("sliding_window_attention", D_MODEL, MAX_LEN, **bad)
