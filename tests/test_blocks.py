"""The block contract, checked for every registered block type on fresh random inputs."""

import inspect
import math

import pytest
import torch
import torch.nn.functional as F
from torch_threads import torch_threads

import blocks
from blocks.init import round_up

D_MODEL, MAX_LEN = 32, 64


def _build(name, **kw):
    torch.manual_seed(torch.seed())  # fresh weights every run
    return blocks.build(name, D_MODEL, MAX_LEN, **kw)


@pytest.mark.parametrize("name", blocks.names())
def test_block_maps_shape_and_keeps_float32(name):
    blk = _build(name)
    x = torch.randn(3, 17, D_MODEL)
    y = blk(x)
    assert y.shape == x.shape
    assert y.dtype == torch.float32
    assert torch.isfinite(y).all()


@pytest.mark.parametrize("name", blocks.names())
def test_block_is_causal(name):
    blk = _build(name).eval()
    seq = 24
    x = torch.randn(2, seq, D_MODEL)
    t = int(torch.randint(0, seq - 1, ()).item())
    x2 = x.clone()
    x2[:, t + 1 :] = torch.randn(2, seq - t - 1, D_MODEL) * 3
    with torch.no_grad():
        y, y2 = blk(x), blk(x2)
    torch.testing.assert_close(y[:, : t + 1], y2[:, : t + 1], rtol=1e-5, atol=1e-5)
    assert not torch.allclose(y[:, t + 1 :], y2[:, t + 1 :])


@pytest.mark.parametrize("name", blocks.names())
def test_block_gradients_are_finite_and_reach_every_parameter(name):
    blk = _build(name)
    x = torch.randn(2, 19, D_MODEL, requires_grad=True)
    blk(x).square().mean().backward()
    assert torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0
    for pname, p in blk.named_parameters():
        assert p.grad is not None, f"{name}.{pname} received no gradient"
        assert torch.isfinite(p.grad).all(), f"{name}.{pname} has a non-finite gradient"


@pytest.mark.parametrize("name", blocks.names())
def test_block_reports_params_and_state_size(name):
    blk = _build(name)
    assert blk.num_params() == sum(p.numel() for p in blk.parameters())
    for seq in (16, 128):
        size = blk.state_size(seq)
        assert isinstance(size, int) and size >= 0


@pytest.mark.parametrize("name", blocks.names())
def test_block_takes_stack_position(name):
    params = inspect.signature(blocks.get(name)).parameters
    assert "block_index" in params and "num_blocks" in params
    blk = blocks.build(name, D_MODEL, MAX_LEN, block_index=2, num_blocks=4)
    assert blk(torch.randn(1, 5, D_MODEL)).shape == (1, 5, D_MODEL)


def test_attention_parameter_count_and_state_size():
    heads, kv = 4, 2
    blk = blocks.build("attention", D_MODEL, MAX_LEN, num_heads=heads, num_kv_heads=kv, window=8)
    head_dim = D_MODEL // heads
    expected = D_MODEL  # norm weight
    expected += D_MODEL * (D_MODEL + 2 * kv * head_dim) + D_MODEL * D_MODEL
    assert blk.num_params() == expected
    assert blk.state_size(100) == 2 * kv * head_dim * 8
    assert blk.state_size(5) == 2 * kv * head_dim * 5


def test_swiglu_parameter_count():
    blk = blocks.build("swiglu", D_MODEL, MAX_LEN)
    hidden = round_up(8 / 3 * D_MODEL, 64)
    assert blk.num_params() == D_MODEL + 3 * D_MODEL * hidden
    assert blk.state_size(1000) == 0


def _reference_attention(blk, x):
    """Slow attention: explicit softmax over allowed positions, loop over queries."""
    B, S, D = x.shape
    u = blk.norm(x)
    H, KV, hd = blk.num_heads, blk.num_kv_heads, blk.head_dim
    q, k, v = blk.qkv(u).split([D, KV * hd, KV * hd], dim=-1)
    q = q.view(B, S, H, hd)
    k = k.view(B, S, KV, hd)
    v = v.view(B, S, KV, hd)
    if blk.position == "rope":
        half = hd // 2
        pos = torch.arange(S, dtype=torch.float64)[:, None]
        inv = blk.rope_base ** (-torch.arange(half, dtype=torch.float64) * 2 / hd)
        ang = (pos * inv).float()  # (S, half)

        def rot(t):
            a, b = t[..., :half], t[..., half:]
            c, s = ang.cos()[None, :, None], ang.sin()[None, :, None]
            return torch.cat([a * c - b * s, a * s + b * c], -1)

        q, k = rot(q), rot(k)
    out = torch.zeros(B, S, H, hd)
    for t in range(S):
        lo = 0 if blk.window is None else max(0, t - blk.window + 1)
        for h in range(H):
            g = h // (H // KV)
            scores = (q[:, t, h, None, :] * k[:, lo : t + 1, g]).sum(-1) / math.sqrt(hd)
            w = scores.softmax(-1)
            out[:, t, h] = (w[..., None] * v[:, lo : t + 1, g]).sum(1)
    return x + blk.out(out.reshape(B, S, D))


@pytest.mark.parametrize(
    "opts",
    [
        {},
        {"position": "none"},
        {"num_kv_heads": 2},
        {"window": 5},
        {"window": 3, "num_kv_heads": 1},
    ],
)
def test_attention_matches_slow_reference(opts):
    blk = blocks.build("attention", D_MODEL, MAX_LEN, **opts).eval()
    x = torch.randn(2, 13, D_MODEL)
    with torch.no_grad():
        torch.testing.assert_close(blk(x), _reference_attention(blk, x), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize(
    "bad",
    [
        {"num_heads": 5},
        {"num_kv_heads": 3},
        {"window": 0},
        {"position": "alibi"},
    ],
)
def test_attention_rejects_bad_options(bad):
    with pytest.raises(blocks.BlockError):
        blocks.build("attention", D_MODEL, MAX_LEN, **bad)


def test_unknown_block_lists_valid_names():
    with pytest.raises(blocks.BlockError, match="valid blocks: .*mlstm"):
        blocks.build("mlstn", D_MODEL, MAX_LEN)


def test_duplicate_registration_is_refused():
    with pytest.raises(blocks.BlockError, match="already registered"):

        @blocks.register("attention")
        class Other(blocks.Block):  # noqa: F841
            pass


def test_registered_names_include_foundation_blocks():
    assert {"attention", "mlstm", "slstm", "swiglu"} <= set(blocks.names())


@pytest.mark.parametrize("K", [1, 2, 4])
@pytest.mark.parametrize("with_bias", [True, False])
def test_causal_depthwise_conv_matches_the_direct_sum(K, with_bias):
    """The shared conv (channels-last 2-D kernel) against y_t = b + sum_k w_k x_{t-K+1+k},
    written out position by position in float64; gradients by autograd through the sum."""
    from blocks.ops import causal_depthwise_conv

    B, S, C = 3, 13, 6
    x = torch.randn(B, S, C, dtype=torch.float64, requires_grad=True)
    w = torch.randn(C, 1, K, dtype=torch.float64, requires_grad=True)
    b = torch.randn(C, dtype=torch.float64, requires_grad=True) if with_bias else None

    def direct(x, w, b):
        rows = []
        for t in range(S):
            y_t = b.expand(B, C) if b is not None else x.new_zeros(B, C)
            for k in range(K):
                s = t - K + 1 + k
                if s >= 0:
                    y_t = y_t + w[:, 0, k] * x[:, s]
            rows.append(y_t)
        return torch.stack(rows, dim=1)

    leaves = [t for t in (x, w, b) if t is not None]
    y, ref = causal_depthwise_conv(x, w, b), direct(x, w, b)
    torch.testing.assert_close(y, ref)
    weight = torch.randn_like(ref)
    got = torch.autograd.grad((y * weight).sum(), leaves)
    want = torch.autograd.grad((ref * weight).sum(), leaves)
    for g, r in zip(got, want):
        torch.testing.assert_close(g, r)


@pytest.mark.parametrize("strict", [False, True])
def test_decayed_scores_factored_equals_the_exact_form_and_strong_decays_stay_exact(strict):
    """GLA's and RWKV-6's intra-chunk scores: mild decays take the factored product, which
    equals the per-channel exponentials; decays beyond the limit keep the exact form (the
    factored one would overflow to inf and NaN there)."""
    from blocks.ops import DECAY_FACTOR_LIMIT, decayed_scores

    L, d = 9, 5
    q = torch.randn(2, 3, L, d, dtype=torch.float64)
    k = torch.randn(2, 3, L, d, dtype=torch.float64)
    mild = -torch.rand(2, 3, L, d, dtype=torch.float64).cumsum(-2)  # |b| <= 9
    b_q = F.pad(mild[..., :-1, :], (0, 0, 1, 0)) if strict else mild
    exact = decayed_scores(q, k, b_q, mild, strict=strict, factored=False)
    direct = torch.zeros(2, 3, L, L, dtype=torch.float64)
    for t in range(L):
        for s in range(t if strict else t + 1):
            decay = (b_q[..., t, :] - mild[..., s, :]).exp()
            direct[..., t, s] = (q[..., t, :] * k[..., s, :] * decay).sum(-1)
    torch.testing.assert_close(exact, direct)
    torch.testing.assert_close(decayed_scores(q, k, b_q, mild, strict=strict), direct)

    strong = mild * (3 * DECAY_FACTOR_LIMIT / mild.abs().amax())
    b_q = F.pad(strong[..., :-1, :], (0, 0, 1, 0)) if strict else strong
    q32, k32 = q.float(), k.float()
    auto = decayed_scores(q32, k32, b_q.float(), strong.float(), strict=strict)
    assert torch.isfinite(auto).all()
    torch.testing.assert_close(
        auto, decayed_scores(q32, k32, b_q.float(), strong.float(), strict=strict, factored=False)
    )


def test_rotary_tables_first_built_in_inference_mode_still_train():
    """The rotary tables are cached per size; a size first seen under torch.inference_mode (an
    evaluation) must not poison training at that size (inference tensors cannot be saved for
    backward)."""
    seq = int(torch.randint(150, 190, ()))  # a size no other test caches
    block = blocks.build("attention", 32, seq)
    x = torch.randn(2, seq, 32)
    with torch.inference_mode():
        block(x)
    y = block(x.requires_grad_())
    y.sum().backward()
    assert torch.isfinite(x.grad).all()


# ---------------------------------------------------------------------------------------------
# the gated linear unit of SwiGLU and the sLSTM's FFN: C kernel against torch in float64


@pytest.mark.skipif(blocks.native.compiler() is None, reason="no C compiler")
@pytest.mark.parametrize("activation", ["silu", "gelu"])
@pytest.mark.parametrize("threads", [1, 3])
@pytest.mark.parametrize("shape", [(3, 11, 128), (5, 16), (1, 2, 4, 64)])
def test_native_glu_matches_torch(activation, threads, shape):
    from blocks.ops import glu

    gate_up = torch.randn(*shape) * 3  # well into both tails of the activations
    dy = torch.randn(*shape[:-1], shape[-1] // 2)
    results = []
    before = torch.get_num_threads()
    for impl, dtype in (("torch", torch.float64), ("native", torch.float32)):
        leaf = gate_up.to(dtype).requires_grad_()
        with torch_threads(threads if impl == "native" else before):
            y = glu(leaf, activation, impl=impl)
            (g,) = torch.autograd.grad(y, [leaf], dy.to(dtype))
        results.append((y.double(), g.double()))
    for got, want in zip(results[1], results[0]):
        err = ((got - want).abs().max() / want.abs().max()).item()
        assert err < 1e-6, f"relative error {err:.2e}"


def test_glu_refuses_unknown_activations_and_odd_halves():
    from blocks.ops import glu

    with pytest.raises(ValueError, match="activation must be one of silu, gelu"):
        glu(torch.randn(2, 16), "relu")
    x = torch.randn(2, 12)  # halves of 6: torch's operators
    torch.testing.assert_close(glu(x), torch.nn.functional.silu(x[:, :6]) * x[:, 6:])
    with pytest.raises(RuntimeError, match="multiples of 8"):
        glu(x, impl="native")
