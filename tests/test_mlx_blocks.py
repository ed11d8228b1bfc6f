"""MLX twins: the same parameter names, outputs and gradients as the torch blocks, causality,
and the same initialisation. Needs the mlx extra (CI installs it)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import blocks

pytest.importorskip("mlx.core")
import mlx_parity as P  # noqa: E402

mx = P.load()
D_MODEL, MAX_LEN = 32, 64


def test_every_builtin_block_has_an_mlx_twin():
    assert blocks.names("mlx") == [n for n in blocks.names() if n in blocks.names("mlx")]
    missing = sorted(set(blocks.names()) - set(blocks.names("mlx")))
    assert not missing, f"blocks without an MLX twin: {missing}"



# (block, options) pairs: every block at its defaults, plus the options that change the maths.
CASES = [(n, {}) for n in blocks.names()] + [
    ("attention", {"num_kv_heads": 2}),
    ("attention", {"window": 5}),
    ("attention", {"position": "none"}),
]


def _available(name):
    return name in blocks.names("mlx")


@pytest.mark.parametrize("name,options", CASES, ids=lambda v: str(v) if v else "defaults")
def test_twin_matches_torch_outputs_and_gradients(name, options):
    if not _available(name):
        pytest.skip(f"no MLX twin of {name} yet")
    tblock, mblock = P.pair(name, D_MODEL, MAX_LEN, **options)
    seq = int(np.random.default_rng().integers(9, 40))
    P.compare(tblock, mblock, torch.randn(2, seq, D_MODEL))


@pytest.mark.parametrize("name", blocks.names())
def test_twin_is_causal(name):
    if not _available(name):
        pytest.skip(f"no MLX twin of {name} yet")
    mblock = blocks.build(name, D_MODEL, MAX_LEN, backend="mlx")
    seq = 24
    x = np.random.default_rng().standard_normal((2, seq, D_MODEL)).astype(np.float32)
    t = int(np.random.default_rng().integers(0, seq - 1))
    x2 = x.copy()
    x2[:, t + 1:] = 3 * np.random.default_rng().standard_normal((2, seq - t - 1, D_MODEL))
    y, y2 = P.to_np(mblock(mx.array(x))), P.to_np(mblock(mx.array(x2)))
    np.testing.assert_allclose(y[:, : t + 1], y2[:, : t + 1], rtol=1e-5, atol=1e-5)
    assert not np.allclose(y[:, t + 1:], y2[:, t + 1:])


@pytest.mark.parametrize("name", blocks.names())
def test_twin_initialisation_matches_torch(name):
    """Same parameter names and shapes, and per parameter the same distribution: mean and
    standard deviation of the twin's fresh weights within sampling error of the torch block's
    (several draws pooled), constants equal."""
    if not _available(name):
        pytest.skip(f"no MLX twin of {name} yet")
    from mlx.utils import tree_flatten

    draws = 4
    tstats, mstats = {}, {}
    for _ in range(draws):
        torch.manual_seed(torch.seed())
        mx.random.seed(int(np.random.default_rng().integers(2**31)))
        t = blocks.build(name, D_MODEL, MAX_LEN, num_blocks=3)
        m = blocks.build(name, D_MODEL, MAX_LEN, backend="mlx", num_blocks=3)
        for k, v in t.state_dict().items():
            tstats.setdefault(k, []).append(v.numpy().ravel())
        for k, v in tree_flatten(m.parameters()):
            mstats.setdefault(k, []).append(P.to_np(v).ravel())
    assert set(tstats) == set(mstats)
    for k in tstats:
        a, b = np.concatenate(tstats[k]), np.concatenate(mstats[k])
        assert a.shape == b.shape, k
        sd = max(a.std(), b.std())
        if sd < 1e-7:  # a constant (ones, zeros, a fixed schedule): equal
            np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6, err_msg=k)
            continue
        n = a.size
        # a deterministic pattern (e.g. a linspace of biases) is compared value for value
        if np.allclose(np.concatenate(tstats[k][:1] * draws), a):
            np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6, err_msg=k)
            continue
        tol = 6 * sd / np.sqrt(n) + 1e-6
        assert abs(a.mean() - b.mean()) <= tol, f"{name}.{k}: mean {a.mean():.4g} vs {b.mean():.4g}"
        # 15% plus sampling error: a few-value parameter (mh_hyena's filter_bias: 8 values) has a
        # noisy standard deviation even between two torch draws
        assert abs(a.std() - b.std()) <= (0.15 + 3 / np.sqrt(n)) * sd + 1e-6, (
            f"{name}.{k}: std {a.std():.4g} vs {b.std():.4g}")


def test_twin_refuses_bad_options_like_torch():
    with pytest.raises(blocks.BlockError, match="divisible by num_heads"):
        blocks.build("attention", 30, MAX_LEN, backend="mlx", num_heads=4)


def test_twin_reports_params_and_state_size_of_torch_block():
    for name in blocks.names("mlx"):
        t = blocks.build(name, D_MODEL, MAX_LEN)
        m = blocks.build(name, D_MODEL, MAX_LEN, backend="mlx")
        assert m.num_params() == t.num_params(), name
        for seq in (16, 128):
            assert m.state_size(seq) == t.state_size(seq), name
