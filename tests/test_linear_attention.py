"""Linear attention: chunked form against mad-lab's quadratic form and a per-step loop."""

import math

import pytest
import torch
import torch.nn.functional as F

import blocks
from blocks.linear_attention import (
    linear_attention_chunked,
    linear_attention_quadratic,
    taylor_features,
)

D_MODEL, MAX_LEN = 32, 64


def _loop_reference(q, k, v, eps, normalize):
    """Recurrent form: running state Σ φ(k) vᵀ and normaliser Σ φ(k)."""
    state = q.new_zeros(*q.shape[:2], q.shape[-1], v.shape[-1])
    norm = q.new_zeros(*q.shape[:2], q.shape[-1])
    outs = []
    for t in range(q.shape[2]):
        state = state + k[:, :, t, :, None] * v[:, :, t, None]
        norm = norm + k[:, :, t]
        num = (q[:, :, t, :, None] * state).sum(-2)
        outs.append(num / ((q[:, :, t] * norm).sum(-1, keepdim=True) + eps) if normalize else num)
    return torch.stack(outs, dim=2)


@pytest.mark.parametrize("normalize", [True, False])
@pytest.mark.parametrize("seq,chunk", [(37, 8), (64, 16), (5, 64)])
def test_chunked_linear_attention_matches_quadratic_and_loop(normalize, seq, chunk):
    # positive features (elu + 1) keep the normaliser away from zero, so tolerances are tight
    q = F.elu(torch.randn(2, 3, seq, 4, dtype=torch.float64)) + 1
    k = F.elu(torch.randn(2, 3, seq, 4, dtype=torch.float64)) + 1
    v = torch.randn(2, 3, seq, 5, dtype=torch.float64)
    inputs = [t.requires_grad_() for t in (q, k, v)]
    y = linear_attention_chunked(*inputs, 1e-12, normalize, chunk)
    dy = torch.randn_like(y)
    grads = torch.autograd.grad(y, inputs, dy)
    for ref in (linear_attention_quadratic, _loop_reference):
        y_ref = ref(*inputs, 1e-12, normalize)
        torch.testing.assert_close(y, y_ref, rtol=1e-10, atol=1e-10)
        for g, g_ref in zip(grads, torch.autograd.grad(y_ref, inputs, dy)):
            torch.testing.assert_close(g, g_ref, rtol=1e-10, atol=1e-10)


def test_taylor_features_give_second_order_exponential_kernel():
    d = 6
    q, k = torch.randn(10, d, dtype=torch.float64), torch.randn(10, d, dtype=torch.float64)
    dot = (q * k).sum(-1)
    expected = 1 + dot / math.sqrt(d) + dot.square() / (2 * d)
    torch.testing.assert_close((taylor_features(q) * taylor_features(k)).sum(-1), expected)
    assert taylor_features(q).shape[-1] == 1 + d + d * (d + 1) // 2


def _reference_block(blk, x):
    """The block spelled out with the quadratic form."""
    B, S, _ = x.shape
    u = blk.norm(x)

    def heads(t):
        return t.view(B, S, blk.num_heads, -1).transpose(1, 2)

    q = blk._features(heads(blk.q_proj(u)), "q")
    k = blk._features(heads(blk.k_proj(u)), "k")
    o = linear_attention_quadratic(q, k, heads(blk.v_proj(u)), blk.eps, blk.normalize)
    return x + blk.out_proj(o.transpose(1, 2).reshape(B, S, -1))


@pytest.mark.parametrize("opts", [
    {"feature_map": "elu", "chunk_size": 8}, {"feature_map": "taylor", "num_heads": 8},
    {"feature_map": "relu", "normalize": False}, {"normalize": False, "chunk_size": 5},
    {"feature_map": "identity", "normalize": False, "num_heads": 4},
])
def test_linear_attention_block_matches_quadratic_reference(opts):
    blk = blocks.build("linear_attention", D_MODEL, MAX_LEN, **opts)
    x = torch.randn(2, 21, D_MODEL)
    with torch.no_grad():
        torch.testing.assert_close(blk(x), _reference_block(blk, x), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("opts,feat", [
    ({"feature_map": "elementwise_product"}, 2),
    ({"feature_map": "elementwise_product", "tie_feature_map_qk": True}, 2),
    ({}, 2), ({"feature_map": "taylor", "num_heads": 4}, 45),
    ({"feature_map": "elu", "normalize": False}, 2),
])
def test_linear_attention_parameter_count_and_state_size(opts, feat):
    blk = blocks.build("linear_attention", D_MODEL, MAX_LEN, **opts)
    d, H = D_MODEL, opts.get("num_heads", 16)
    hk = d // H
    expected = d + 4 * d * d
    if opts.get("feature_map", "elu") == "elementwise_product":
        expected += (2 if opts.get("tie_feature_map_qk") else 4) * (hk * hk + hk)
    assert blk.num_params() == expected
    assert blk.feature_dim == feat
    normaliser = feat if opts.get("normalize", True) else 0
    assert blk.state_size(9) == blk.state_size(900) == H * (feat * hk + normaliser)


@pytest.mark.parametrize("bad", [
    {"num_heads": 5}, {"feature_map": "softmax"}, {"eps": -1.0}, {"chunk_size": 0},
])
def test_linear_attention_rejects_bad_options(bad):
    with pytest.raises(blocks.BlockError, match="linear_attention"):
        blocks.build("linear_attention", D_MODEL, MAX_LEN, **bad)
