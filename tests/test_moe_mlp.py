"""Mixture-of-experts MLP: dense dispatch against a per-token loop; the load-balancing loss."""

import copy

import pytest
import torch
import torch.nn.functional as F

import blocks
from mad_search.model import aux_loss

D_MODEL, MAX_LEN = 32, 64


def _per_token_reference(blk, x):
    """Route each token on its own and run only its chosen experts."""
    u = blk.norm(x).reshape(-1, D_MODEL)
    out = torch.zeros_like(u)
    for n in range(u.shape[0]):
        probs = (blk.router.weight @ u[n] + blk.router.bias).softmax(-1)
        chosen = probs.argsort(descending=True)[: blk.active_experts]
        total = probs[chosen].sum()
        for e in chosen.tolist():
            hidden = u[n] @ blk.up[e]
            if blk.up_bias is not None:
                hidden = hidden + blk.up_bias[e]
            lin, gate = hidden[: blk.dim_inner], hidden[blk.dim_inner:]
            y = (lin * F.gelu(gate, approximate="tanh")) @ blk.down[e]
            if blk.down_bias is not None:
                y = y + blk.down_bias[e]
            out[n] += probs[e] / total * y
    return x + out.view_as(x)


@pytest.mark.parametrize("opts", [{}, {"num_experts": 4, "active_experts": 1, "bias": True},
                                  {"num_experts": 3, "active_experts": 3, "dim_inner": 7}])
def test_moe_matches_per_token_loop(opts):
    blk = blocks.build("moe_mlp", D_MODEL, MAX_LEN, **opts)
    with torch.no_grad():  # a larger router spread makes the top-k choice unambiguous
        blk.router.weight.normal_(0, 1.0)
        blk.router.bias.normal_(0, 0.5)
    x = torch.randn(2, 9, D_MODEL)
    with torch.no_grad():
        torch.testing.assert_close(blk(x), _per_token_reference(blk, x), rtol=1e-4, atol=1e-5)


def _balance_loss(blk, x):
    u = blk.norm(x).reshape(-1, D_MODEL)
    probs = blk.router(u).softmax(-1)
    chosen = probs.topk(blk.active_experts, -1).indices
    f = torch.stack([(chosen == e).float().sum() for e in range(blk.num_experts)]) / chosen.numel()
    return blk.num_experts * (f * probs.mean(0)).sum()


def test_moe_leaves_weighted_switch_balance_loss_for_the_trainer():
    blk = blocks.build("moe_mlp", D_MODEL, MAX_LEN, aux_loss_weight=0.5)
    x = torch.randn(3, 11, D_MODEL)
    blk(x)
    expected = 0.5 * _balance_loss(blk, x)
    torch.testing.assert_close(blk.aux_loss, expected)
    model = torch.nn.Sequential(blk, blocks.build("swiglu", D_MODEL, MAX_LEN))
    torch.testing.assert_close(aux_loss(model), expected)
    # the loss trains the router: it has a gradient of its own
    blk.aux_loss.backward()
    assert blk.router.weight.grad.abs().sum() > 0


def test_moe_balance_loss_is_one_when_routing_is_uniform_and_grows_when_skewed():
    blk = blocks.build("moe_mlp", D_MODEL, MAX_LEN, num_experts=4, active_experts=1,
                       aux_loss_weight=1.0)
    with torch.no_grad():
        blk.router.weight.zero_()
        blk.router.bias.zero_()
    x = torch.randn(2, 8, D_MODEL)
    blk(x)  # P_e = 1/4 for every expert, so E · Σ f_e P_e = 1 whatever the tie-breaking
    torch.testing.assert_close(blk.aux_loss, torch.tensor(1.0))
    with torch.no_grad():
        blk.router.bias.copy_(torch.tensor([5.0, 0.0, 0.0, 0.0]))
    blk(x)
    assert blk.aux_loss > 1.5  # all tokens to expert 0 with high probability: loss near E


def test_moe_block_can_be_deep_copied_after_a_forward_pass():
    blk = blocks.build("moe_mlp", D_MODEL, MAX_LEN)
    x = torch.randn(2, 5, D_MODEL)
    y = blk(x)
    twin = copy.deepcopy(blk)
    assert twin.aux_loss is None and blk.aux_loss is not None
    torch.testing.assert_close(twin(x), y)


def test_moe_parameter_count_and_state_size():
    E, m = 6, 5
    for bias in (False, True):
        blk = blocks.build("moe_mlp", D_MODEL, MAX_LEN, num_experts=E, dim_inner=m, bias=bias)
        expected = D_MODEL + D_MODEL * E + E + E * 3 * D_MODEL * m
        if bias:
            expected += E * (2 * m + D_MODEL)
        assert blk.num_params() == expected
        assert blk.state_size(100) == 0
    assert blocks.build("moe_mlp", 128, MAX_LEN).dim_inner == 16  # mad-lab's width at d_model 128


@pytest.mark.parametrize("bad", [
    {"num_experts": 0}, {"active_experts": 9}, {"active_experts": 0}, {"dim_inner": 0},
    {"aux_loss_weight": -1.0},
])
def test_moe_rejects_bad_options(bad):
    with pytest.raises(blocks.BlockError, match="moe_mlp"):
        blocks.build("moe_mlp", D_MODEL, MAX_LEN, **bad)
