"""The causal attention kernel (blocks/csrc/attention.c) against torch and a slow loop."""

from __future__ import annotations

import math
import os
import subprocess
import sys

import pytest
import torch
from torch_threads import torch_threads

import blocks
from blocks import native
from blocks.attention import NATIVE_MAX_HEAD, causal_attention

needs_native = pytest.mark.skipif(native.compiler() is None, reason="no C compiler")


def _loop_attention(q, k, v, window=None):
    """Softmax over each query's visible keys, one query at a time, in float64."""
    q, k, v = q.double(), k.double(), v.double()
    B, S, H, D = q.shape
    G = H // k.shape[2]
    out = torch.zeros(B, S, H, D, dtype=torch.float64)
    for t in range(S):
        lo = 0 if window is None else max(0, t - window + 1)
        for h in range(H):
            scores = (q[:, t, h, None] * k[:, lo:t + 1, h // G]).sum(-1) / math.sqrt(D)
            out[:, t, h] = (scores.softmax(-1)[..., None] * v[:, lo:t + 1, h // G]).sum(1)
    return out


def _inputs(B, S, H, KVH, D, wide=True):
    """q, k, v as the attention block makes them: views of one wider (B, S, X) tensor."""
    if wide:
        base = torch.randn(B, S, H + 2 * KVH + 1, D)
        parts = base[:, :, :H], base[:, :, H:H + KVH], base[:, :, H + KVH:H + 2 * KVH]
    else:
        parts = torch.randn(B, S, H, D), torch.randn(B, S, KVH, D), torch.randn(B, S, KVH, D)
    return [t.detach().requires_grad_() for t in parts]


def _run(impl, q, k, v, dy, window=None, dtype=None):
    leaves = [t.detach().to(dtype or t.dtype).requires_grad_() for t in (q, k, v)]
    y = causal_attention(*leaves, window=window, impl=impl)
    grads = torch.autograd.grad(y, leaves, dy.to(y.dtype))
    return [y.detach().double()] + [g.double() for g in grads]


@needs_native
@pytest.mark.parametrize(
    "B, S, H, KVH, D, window",
    [
        (3, 47, 4, 4, 8, None),  # the default study's attention: heads of 8, 47 positions
        (2, 30, 4, 2, 16, None),  # grouped-query heads
        (2, 19, 6, 3, 24, 7),  # a window
        (1, 70, 2, 1, 64, 33),  # the largest head, mad-lab's sliding window
        (2, 5, 1, 1, 8, None),  # shorter than one vector of keys
        (2, 33, 2, 2, 32, 1),  # window 1: each position sees only itself
        (1, 9, 3, 1, 48, None),
    ],
)
def test_native_attention_matches_torch_in_float64(B, S, H, KVH, D, window):
    q, k, v = _inputs(B, S, H, KVH, D)
    dy = torch.randn(B, S, H, D)
    got = _run("native", q, k, v, dy, window)
    want = _run("torch", q, k, v, dy, window, dtype=torch.float64)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=5e-6)


@needs_native
def test_native_attention_matches_a_slow_loop():
    q, k, v = _inputs(2, 21, 4, 2, 8)
    for window in (None, 6):
        with torch.no_grad():
            y = causal_attention(q, k, v, window=window, impl="native")
        torch.testing.assert_close(y.double(), _loop_attention(q, k, v, window),
                                   rtol=1e-5, atol=1e-6)


@needs_native
@pytest.mark.parametrize("threads", [1, 2, 3])
def test_native_attention_splits_lanes_over_threads(threads):
    # lanes are (batch element, key/value head): with grouped heads no two slices share dk, dv
    q, k, v = _inputs(5, 26, 4, 2, 16, wide=False)
    dy = torch.randn(5, 26, 4, 16)
    want = _run("torch", q, k, v, dy, dtype=torch.float64)
    with torch_threads(threads):
        got = _run("native", q, k, v, dy)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=5e-6)


@needs_native
def test_native_attention_reads_any_layout():
    # a (B, H, S, D) tensor seen as (B, S, H, D) is not token-major: it is copied, not misread
    q, k, v = (torch.randn(2, 3, 17, 8).transpose(1, 2) for _ in range(3))
    torch.testing.assert_close(causal_attention(q, k, v, impl="native"),
                               causal_attention(q, k, v, impl="torch"), rtol=1e-5, atol=1e-6)


@needs_native
def test_native_attention_propagates_nan():
    q, k, v = (t.detach() for t in _inputs(2, 12, 2, 2, 8))
    k[1, 5, 0, 3] = float("nan")  # one key of head 0, batch element 1, position 5
    y = causal_attention(q, k, v, impl="native")
    assert torch.isfinite(y[0]).all() and torch.isfinite(y[1, :, 1]).all()
    assert torch.isfinite(y[1, :5, 0]).all() and torch.isnan(y[1, 5:, 0]).all()


def test_heads_the_kernel_cannot_take_run_on_torch():
    q, k, v = (t.detach() for t in _inputs(2, 9, 2, 2, 12))
    y = causal_attention(q, k, v)  # auto: torch's kernel
    torch.testing.assert_close(y.double(), _loop_attention(q, k, v), rtol=1e-5, atol=1e-6)
    with pytest.raises(RuntimeError, match="multiples of 8"):
        causal_attention(q, k, v, impl="native")
    big = [torch.randn(1, 4, 1, NATIVE_MAX_HEAD + 8) for _ in range(3)]
    with pytest.raises(RuntimeError, match="multiples of 8"):
        causal_attention(*big, impl="native")


def test_causal_attention_refuses_an_unknown_impl_and_float64_native():
    q, k, v = (t.detach() for t in _inputs(1, 4, 1, 1, 8))
    with pytest.raises(ValueError, match="impl must be"):
        causal_attention(q, k, v, impl="cuda")
    with pytest.raises(RuntimeError, match="not float32 on the CPU"):
        causal_attention(q.double(), k.double(), v.double(), impl="native")


@pytest.mark.parametrize("opts", [{}, {"num_kv_heads": 2}, {"window": 5}])
def test_attention_block_gradients_agree_with_and_without_the_kernel(opts, monkeypatch):
    # the block through whichever path "auto" takes here, against the torch path in float64
    torch.manual_seed(0)
    blk = blocks.build("attention", 32, 64, **opts)
    x = torch.randn(3, 20, 32)
    y = blk(x.requires_grad_())
    grads = torch.autograd.grad(y.sum(), [x, *blk.parameters()])
    ref = blk.double()
    import blocks.attention as attention

    real = attention.causal_attention
    monkeypatch.setattr(attention, "causal_attention",
                        lambda *a, **kw: real(*a, **{**kw, "impl": "torch"}))
    xd = x.detach().double().requires_grad_()
    y_ref = ref(xd)
    grads_ref = torch.autograd.grad(y_ref.sum(), [xd, *ref.parameters()])
    torch.testing.assert_close(y.double(), y_ref, rtol=1e-5, atol=1e-5)
    for g, g_ref in zip(grads, grads_ref):  # float32 sums over 60 tokens: scaled tolerance
        torch.testing.assert_close(g.double(), g_ref, rtol=1e-4,
                                   atol=1e-4 * g_ref.abs().max().item())


def test_native_attention_off_switch_and_failed_build_fall_back_to_torch(tmp_path):
    code = ("import torch, blocks.attention as a, blocks.native as n; "
            "q = torch.randn(1, 4, 2, 8); y = a.causal_attention(q, q, q); "
            "print('STATUS', n.status.get('attention'))")

    def run(**env):
        return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                              env={**os.environ, "MAD_SEARCH_CACHE": str(tmp_path), **env},
                              timeout=120)

    off = run(MAD_SEARCH_NATIVE="0")
    assert off.returncode == 0, off.stderr
    assert "STATUS torch: MAD_SEARCH_NATIVE=0" in off.stdout and off.stderr == ""
    broken = run(CC="false")
    assert broken.returncode == 0, broken.stderr
    assert "STATUS torch: building it failed" in broken.stdout
    lines = [ln for ln in broken.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and "native attention kernel unavailable" in lines[0]


@needs_native
@pytest.mark.parametrize("B, S, heads, D", [(3, 11, 8, 8), (2, 5, 3, 16), (1, 7, 2, 6)])
def test_native_rotary_matches_torch(B, S, heads, D):
    from blocks.attention import rotary, rotary_tables

    wide = torch.randn(B, S, heads + 2, D)  # the block's q and k: a view of a wider tensor
    x = wide[:, :, :heads]
    cos, sin = rotary_tables(S, D, 10000.0)
    dy = torch.randn(B, S, heads, D)
    results = []
    for impl, dtype in (("torch", torch.float64), ("native", torch.float32)):
        leaf = x.to(dtype).requires_grad_()
        y = rotary(leaf, cos.to(dtype), sin.to(dtype), impl=impl)
        (g,) = torch.autograd.grad(y, [leaf], dy.to(dtype))
        results.append((y.double(), g.double()))
    for got, want in zip(results[1], results[0]):
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
