"""MLX twins of linear_attention, gated_linear_attention, rwkv6 and moe_mlp: parity with the torch
blocks for every option that changes the maths, the chunked cells against torch's step-by-step
recurrences (mild and strong decays), RWKV-6's depth-dependent initialisation, and MoE's
auxiliary loss. Inputs and weights are fresh random draws on every run."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import blocks

pytest.importorskip("mlx.core")
import mlx_parity as P  # noqa: E402

mx = P.load()
from blocks.gated_linear_attention import gla_recurrent_reference  # noqa: E402
from blocks.mlx.gated_linear_attention import gla_chunked  # noqa: E402
from blocks.mlx.rwkv6 import wkv6_chunked  # noqa: E402
from blocks.rwkv6 import wkv6_recurrent_reference  # noqa: E402

D_MODEL, MAX_LEN = 32, 64
rng = np.random.default_rng()


def _seq(low: int = 9, high: int = 40) -> int:
    return int(rng.integers(low, high))


def _resync(tblock, mblock):
    """Copy the torch block's (edited) weights into its twin again."""
    mblock.load_weights([(k, P.to_mx(v)) for k, v in tblock.state_dict().items()], strict=True)


def _check(name, options, seq=None, batch=2, edit=None):
    tblock, mblock = P.pair(name, D_MODEL, MAX_LEN, **options)
    if edit is not None:
        with torch.no_grad():
            edit(tblock)
        _resync(tblock, mblock)
    P.compare(tblock, mblock, torch.randn(batch, seq or _seq(), D_MODEL))
    return tblock, mblock


# --- linear attention ------------------------------------------------------------------------

@pytest.mark.parametrize("options,seq", [
    ({"feature_map": "elu"}, None),
    ({"feature_map": "elu", "normalize": False}, None),
    ({"feature_map": "elu", "eps": 0.5}, None),
    ({"feature_map": "relu", "normalize": False}, None),
    ({"feature_map": "relu", "eps": 1.0}, None),
    ({"feature_map": "identity", "normalize": False, "num_heads": 4}, None),
    ({"feature_map": "taylor", "num_heads": 8}, None),
    ({"feature_map": "taylor", "num_heads": 4, "normalize": False}, None),
    ({"feature_map": "elementwise_product", "normalize": False}, None),
    ({"feature_map": "elementwise_product", "normalize": False, "tie_feature_map_qk": True}, None),
    ({"num_heads": 1, "expand_k": 0.5, "expand_v": 2.0}, None),
    ({"num_heads": 4, "chunk_size": 5}, 23),  # ragged last chunk
    ({"chunk_size": 1}, 11),
    ({"chunk_size": 64}, 9),  # one chunk longer than the sequence
    ({"chunk_size": 8}, 32),  # whole chunks
], ids=str)
def test_linear_attention_options(options, seq):
    _check("linear_attention", options, seq)


@pytest.mark.parametrize("tied", [False, True])
def test_linear_attention_learned_map_with_normaliser(tied):
    """The learned (signed) map with the normaliser. Its denominators can pass near zero, where
    float32 results are ill-conditioned (see blocks/linear_attention.py), so the maps' biases are
    raised to keep φ positive here; the maths compared is the same."""
    def edit(tblock):
        for fmap in (tblock.feature_map_q, tblock.feature_map_k):
            fmap.layer1.bias.uniform_(1.5, 2.5)
            fmap.layer2.bias.uniform_(1.5, 2.5)

    _check("linear_attention", {"feature_map": "elementwise_product", "num_heads": 8,
                                "tie_feature_map_qk": tied}, edit=edit)


def test_linear_attention_tied_maps_stay_one_map():
    tblock, mblock = P.pair("linear_attention", D_MODEL, MAX_LEN,
                            feature_map="elementwise_product", tie_feature_map_qk=True)
    from mlx.utils import tree_flatten

    assert mblock.num_params() == tblock.num_params()
    trainable = {k for k, _ in tree_flatten(mblock.trainable_parameters())}
    assert trainable == {n for n, _ in tblock.named_parameters()}
    # an optimiser-style update of the trainable weights moves the mirror with them
    new = {"feature_map_q": {"layer1": {"weight": mx.random.normal((2, 2))}}}
    mblock.update(new)
    np.testing.assert_array_equal(P.to_np(mblock.feature_map_k.layer1.weight),
                                  P.to_np(new["feature_map_q"]["layer1"]["weight"]))


# --- gated linear attention ------------------------------------------------------------------

@pytest.mark.parametrize("options,seq", [
    ({"num_heads": 1}, None),
    ({"num_heads": 2, "chunk_size": 5}, 23),
    ({"num_heads": 4, "expand_k": 0.5, "gate_low_rank_dim": 4}, None),
    ({"expand_v": 2.0}, None),
    ({"gate_logit_normalizer": 1.0}, None),  # decays 16x stronger
    ({"norm_eps": 0.1}, None),
    ({"chunk_size": 1}, 13),
    ({"chunk_size": 64}, 9),
    ({"chunk_size": 7}, 35),
], ids=str)
def test_gla_options(options, seq):
    _check("gated_linear_attention", options, seq)


def _strong_gla_gates(tblock):
    """Gate biases down to -60 (log α to ≈ -60 per step with normaliser 1): cumulative decays
    pass DECAY_FACTOR_LIMIT within a chunk, so both blocks take the exact form."""
    bias = tblock.gk_proj[1].bias
    bias.copy_(-60 * torch.rand_like(bias))


@pytest.mark.parametrize("chunk_size,seq", [(16, 37), (5, 21)])
def test_gla_strong_decays(chunk_size, seq):
    _check("gated_linear_attention", {"gate_logit_normalizer": 1.0, "chunk_size": chunk_size},
           seq, edit=_strong_gla_gates)


def _cell_parity(mlx_cell, torch_cell, inputs, **kwargs):
    """The MLX chunked cell's output and input gradients against torch's recurrence (float32)."""
    ts = [t.clone().requires_grad_() for t in inputs]
    y = torch_cell(*ts)
    cot = torch.randn_like(y)
    grads = torch.autograd.grad(y, ts, cot)
    ms = [P.to_mx(t) for t in inputs]
    (ym,), vjps = mx.vjp(lambda *a: mlx_cell(*a, **kwargs), ms, [P.to_mx(cot)])
    P._close("cell output", y, ym, 2e-4, 2e-5)
    for i, (g, gm) in enumerate(zip(grads, vjps)):
        assert np.isfinite(P.to_np(gm)).all(), f"gradient {i} not finite"
        P._close(f"cell gradient {i}", g, gm, 2e-4, 2e-5)


def _gla_inputs(seq, strength):
    q, k = torch.randn(2, 3, seq, 4), torch.randn(2, 3, seq, 4)
    v = torch.randn(2, 3, seq, 5)
    log_alpha = -strength * torch.rand(2, 3, seq, 4)
    return [q, k, v, log_alpha]


@pytest.mark.parametrize("strength,factored", [
    (0.3, None), (0.3, True), (0.3, False),  # mild decays: factored by default
    (60.0, None), (60.0, False),  # strong: the exact form (factored would overflow)
])
@pytest.mark.parametrize("seq,chunk", [(37, 8), (5, 16), (23, 1)])
def test_gla_cell_matches_torch_recurrence(strength, factored, seq, chunk):
    _cell_parity(gla_chunked, gla_recurrent_reference, _gla_inputs(seq, strength),
                 chunk=chunk, factored=factored)


def test_gla_under_compile_uses_the_exact_form():
    """Inside mx.compile the decay magnitudes cannot be read: the exact form runs, same result."""
    _, mblock = P.pair("gated_linear_attention", D_MODEL, MAX_LEN)
    x = mx.random.normal((2, _seq(), D_MODEL))
    eager = mblock(x)
    compiled = mx.compile(lambda inp: mblock(inp))(x)
    np.testing.assert_allclose(P.to_np(compiled), P.to_np(eager), rtol=1e-5, atol=1e-5)


# --- RWKV-6 ----------------------------------------------------------------------------------

def _live_loras(tblock):
    """LoRAs large enough to matter (their init is ±1e-4), as tests/test_rwkv6.py does."""
    for p in (tblock.time_maa_w1, tblock.time_maa_w2, tblock.time_decay_w1,
              tblock.time_decay_w2):
        p.normal_(0, 0.2)


@pytest.mark.parametrize("options,seq", [
    ({}, None),
    ({"head_dim": 8, "chunk_size": 5}, 23),
    ({"head_dim": 4}, None),
    ({"dim_att": 64, "block_index": 2, "num_blocks": 3}, None),
    ({"block_index": 1, "num_blocks": 4, "chunk_size": 7}, 30),
    ({"time_mix_extra_dim": 4, "time_decay_extra_dim": 8}, None),
    ({"head_dim_divisor": 2}, None),  # GroupNorm eps 4e-5
    ({"chunk_size": 1}, 12),
    ({"chunk_size": 64}, 9),
], ids=str)
def test_rwkv6_options(options, seq):
    _check("rwkv6", options, seq, edit=_live_loras)


def test_rwkv6_at_its_initial_weights():
    _check("rwkv6", {"block_index": 3, "num_blocks": 5})


def _strong_rwkv_decays(tblock):
    """Decay logits d in [-6, 3]: log w down to -20 per step, mixed with mild channels."""
    _live_loras(tblock)
    tblock.time_decay.uniform_(-6.0, 3.0)


@pytest.mark.parametrize("chunk_size,seq", [(16, 37), (5, 21)])
def test_rwkv6_strong_decays(chunk_size, seq):
    _check("rwkv6", {"chunk_size": chunk_size}, seq, edit=_strong_rwkv_decays)


@pytest.mark.parametrize("strength,factored", [(0.3, None), (0.3, False), (60.0, None)])
@pytest.mark.parametrize("seq,chunk", [(37, 8), (5, 16), (23, 1)])
def test_wkv6_cell_matches_torch_recurrence(strength, factored, seq, chunk):
    r, k, v, log_w = _gla_inputs(seq, strength)
    u = torch.randn(3, 4)
    _cell_parity(wkv6_chunked, wkv6_recurrent_reference, [r, k, v, log_w, u],
                 chunk=chunk, factored=factored)


@pytest.mark.parametrize("block_index,num_blocks,dim_att", [
    (0, 1, None), (0, 4, None), (1, 4, 48), (3, 4, None), (2, 3, 64), (5, 6, 16),
])
def test_rwkv6_depth_schedules_match_value_for_value(block_index, num_blocks, dim_att):
    opts = {"block_index": block_index, "num_blocks": num_blocks}
    if dim_att is not None:
        opts["dim_att"] = dim_att
    t = blocks.build("rwkv6", D_MODEL, MAX_LEN, **opts)
    m = blocks.build("rwkv6", D_MODEL, MAX_LEN, backend="mlx", **opts)
    for name in ("time_maa_x", "time_maa_w", "time_maa_k", "time_maa_v", "time_maa_r",
                 "time_maa_g", "time_decay", "time_faaaa"):
        np.testing.assert_allclose(P.to_np(getattr(m, name)), getattr(t, name).detach().numpy(),
                                   rtol=1e-6, atol=1e-6, err_msg=name)
    np.testing.assert_array_equal(P.to_np(m.ln_x.weight), t.ln_x.weight.detach().numpy())
    assert m.ln_x.eps == t.ln_x.eps


# --- mixture of experts ----------------------------------------------------------------------

def _spread_router(tblock):
    """A wider router: larger gaps between the top-k and the rest."""
    tblock.router.weight.normal_(0, 1.0)
    tblock.router.bias.normal_(0, 0.5)


@pytest.mark.parametrize("options", [
    {},
    {"num_experts": 4, "active_experts": 1},
    {"num_experts": 3, "active_experts": 3, "dim_inner": 7},  # every expert chosen
    {"num_experts": 6, "active_experts": 4, "bias": True},
    {"num_experts": 1, "active_experts": 1, "dim_inner": 5},
    {"num_experts": 16, "active_experts": 2, "dim_inner": 2},
], ids=str)
def test_moe_options(options):
    def edit(tblock):
        _spread_router(tblock)
        if tblock.up_bias is not None:  # biases initialise to zero: make them matter
            tblock.up_bias.normal_(0, 0.5)
            tblock.down_bias.normal_(0, 0.5)

    _check("moe_mlp", options, edit=edit)


def test_moe_at_its_initial_weights():
    _check("moe_mlp", {"num_experts": 5, "active_experts": 2})


@pytest.mark.parametrize("options", [
    {"aux_loss_weight": 0.5},
    {"num_experts": 4, "active_experts": 1, "aux_loss_weight": 1.0},
    {"num_experts": 6, "active_experts": 3, "bias": True},
], ids=str)
def test_moe_aux_loss_and_its_gradient(options):
    """The load-balancing loss left on ``aux_loss``: value and gradient (router only) agree."""
    from mlx.utils import tree_flatten

    tblock, mblock = P.pair("moe_mlp", D_MODEL, MAX_LEN, **options)
    with torch.no_grad():
        _spread_router(tblock)
    _resync(tblock, mblock)
    x = torch.randn(3, _seq(), D_MODEL)
    tblock(x)
    tblock.aux_loss.backward()

    def aux(params):
        mblock.update(params)
        mblock(P.to_mx(x))
        return mblock.aux_loss

    value, grads = mx.value_and_grad(aux)(mblock.trainable_parameters())
    P._close("aux_loss", tblock.aux_loss, value, 1e-5, 1e-7)
    grads = dict(tree_flatten(grads))
    for n, p in tblock.named_parameters():
        if p.grad is None:  # no path to the aux loss (the experts)
            assert not np.any(P.to_np(grads[n])), n
        else:
            P._close(f"aux gradient of {n}", p.grad, grads[n], 2e-4, 1e-7)


def test_moe_aux_loss_is_one_under_uniform_routing_and_not_a_parameter():
    from mlx.utils import tree_flatten

    mblock = blocks.build("moe_mlp", D_MODEL, MAX_LEN, backend="mlx", num_experts=4,
                          active_experts=1, aux_loss_weight=1.0)
    assert mblock.aux_loss is None
    mblock.router.weight = mx.zeros_like(mblock.router.weight)
    mblock(mx.random.normal((2, 8, D_MODEL)))
    assert abs(mblock.aux_loss.item() - 1.0) < 1e-6
    assert "aux_loss" not in dict(tree_flatten(mblock.parameters()))


# --- causality of the chunked forms at chunk sizes that leave a ragged chunk -----------------

@pytest.mark.parametrize("name,options", [
    ("linear_attention", {"chunk_size": 5, "feature_map": "taylor", "num_heads": 8}),
    ("gated_linear_attention", {"chunk_size": 5}),
    ("rwkv6", {"chunk_size": 5, "head_dim": 8}),
    ("moe_mlp", {"num_experts": 4, "active_experts": 2}),
], ids=str)
def test_twins_are_causal_with_options(name, options):
    mblock = blocks.build(name, D_MODEL, MAX_LEN, backend="mlx", **options)
    seq = 23
    x = rng.standard_normal((2, seq, D_MODEL)).astype(np.float32)
    t = int(rng.integers(0, seq - 1))
    x2 = x.copy()
    x2[:, t + 1:] = 3 * rng.standard_normal((2, seq - t - 1, D_MODEL))
    y, y2 = P.to_np(mblock(mx.array(x))), P.to_np(mblock(mx.array(x2)))
    np.testing.assert_allclose(y[:, : t + 1], y2[:, : t + 1], rtol=1e-5, atol=1e-5)
    assert not np.allclose(y[:, t + 1:], y2[:, t + 1:])


def test_strong_decay_test_reaches_the_exact_form():
    """The strong-decay edits above do push cumulative decays past DECAY_FACTOR_LIMIT."""
    from blocks.ops import DECAY_FACTOR_LIMIT

    tblock = blocks.build("gated_linear_attention", D_MODEL, MAX_LEN, gate_logit_normalizer=1.0)
    with torch.no_grad():
        _strong_gla_gates(tblock)
        log_alpha = F.logsigmoid(tblock.gk_proj(tblock.norm(torch.randn(1, 16, D_MODEL))))
    assert log_alpha.sum(1).min() < -DECAY_FACTOR_LIMIT
    tblock = blocks.build("rwkv6", D_MODEL, MAX_LEN)
    with torch.no_grad():
        _strong_rwkv_decays(tblock)
    assert (-tblock.time_decay.exp() * 16).min() < -DECAY_FACTOR_LIMIT


@pytest.mark.parametrize("name,options", [
    ("linear_attention", {"feature_map": "elementwise_product", "tie_feature_map_qk": True}),
    ("linear_attention", {"feature_map": "taylor", "num_heads": 4, "normalize": False}),
    ("gated_linear_attention", {"num_heads": 4, "expand_k": 0.5, "gate_low_rank_dim": 8}),
    ("rwkv6", {"dim_att": 64, "head_dim": 8, "time_mix_extra_dim": 4}),
    ("moe_mlp", {"num_experts": 6, "dim_inner": 5, "bias": True}),
], ids=str)
def test_params_and_state_size_with_options(name, options):
    t = blocks.build(name, D_MODEL, MAX_LEN, **options)
    m = blocks.build(name, D_MODEL, MAX_LEN, backend="mlx", **options)
    assert m.num_params() == t.num_params()
    assert m.state_size(16) == t.state_size(16) and m.state_size(500) == t.state_size(500)


@pytest.mark.parametrize("name,options", [
    ("linear_attention", {"feature_map": "elementwise_product", "num_heads": 2}),
    ("linear_attention", {"feature_map": "elementwise_product", "tie_feature_map_qk": True,
                          "num_heads": 2}),
    ("moe_mlp", {"bias": True}),
    ("gated_linear_attention", {"gate_low_rank_dim": 8, "expand_v": 2.0}),
], ids=str)
def test_initialisation_with_options(name, options):
    """Parameter names and shapes are the state_dict's; per parameter, 16 fresh draws pooled have
    the torch block's mean and spread (constants equal); the learned feature maps stay inside
    nn.Linear's bound 1/sqrt(fan_in)."""
    from mlx.utils import tree_flatten

    draws, tstats, mstats = 16, {}, {}
    for _ in range(draws):
        torch.manual_seed(torch.seed())
        mx.random.seed(int(rng.integers(2**31)))
        t = blocks.build(name, D_MODEL, MAX_LEN, **options)
        m = blocks.build(name, D_MODEL, MAX_LEN, backend="mlx", **options)
        for k, v in t.state_dict().items():
            tstats.setdefault(k, []).append(v.numpy())
        for k, v in tree_flatten(m.parameters()):
            mstats.setdefault(k, []).append(P.to_np(v))
    assert set(tstats) == set(mstats)
    for k in tstats:
        assert tstats[k][0].shape == mstats[k][0].shape, k
        a, b = np.concatenate(tstats[k], None), np.concatenate(mstats[k], None)
        sd = max(a.std(), b.std())
        if sd < 1e-7:
            np.testing.assert_array_equal(a, b, err_msg=k)
            continue
        assert abs(a.mean() - b.mean()) <= 6 * sd / np.sqrt(a.size), k
        assert abs(a.std() - b.std()) <= 0.2 * sd, k
        if k.startswith("feature_map"):
            assert np.abs(b).max() <= 1 / np.sqrt(t.head_k_dim), k
