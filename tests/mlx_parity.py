"""Helpers for the MLX twin tests: copy a torch block's weights into its twin and compare outputs
and gradients on the same input."""

from __future__ import annotations

import numpy as np
import torch

import blocks

mx = None  # set by load(): tests skip cleanly when the mlx extra is missing


def load():
    global mx
    import blocks.mlx  # noqa: F401  (its fast BLAS before MLX)

    # isort: split
    import mlx.core

    mx = mlx.core
    return mx


def to_mx(t: torch.Tensor):
    return mx.array(t.detach().cpu().numpy())


def to_np(a) -> np.ndarray:
    return np.array(a, copy=False)


def pair(name: str, d_model: int, max_len: int, **options):
    """A torch block with fresh random weights and its MLX twin holding the same weights."""
    torch.manual_seed(torch.seed())
    tblock = blocks.build(name, d_model, max_len, **options)
    mblock = blocks.build(name, d_model, max_len, backend="mlx", **options)
    mblock.load_weights([(k, to_mx(v)) for k, v in tblock.state_dict().items()], strict=True)
    return tblock, mblock


def compare(tblock, mblock, x: torch.Tensor, *, rtol: float = 2e-4, atol: float = 2e-5):
    """Outputs, input gradients and every parameter gradient of the two blocks agree (float32
    tolerance, relative to each tensor's largest magnitude) on input ``x`` and a random
    cotangent."""
    from mlx.utils import tree_flatten

    tblock.zero_grad(set_to_none=True)
    x = x.clone().requires_grad_(True)
    y = tblock(x)
    cot = torch.randn_like(y)
    (y * cot).sum().backward()

    xm, cotm = to_mx(x), to_mx(cot)

    def loss(params, inp):
        mblock.update(params)
        return (mblock(inp) * cotm).sum()

    ym = mblock(xm)
    gparams, gx = mx.grad(loss, argnums=(0, 1))(mblock.trainable_parameters(), xm)
    _close("output", y, ym, rtol, atol)
    _close("input gradient", x.grad, gx, rtol, atol)
    gm = dict(tree_flatten(gparams))
    tnames = {n for n, p in tblock.named_parameters() if p.requires_grad}
    assert tnames == set(gm), f"trainable parameters differ: {sorted(tnames ^ set(gm))}"
    for n, p in tblock.named_parameters():
        _close(f"gradient of {n}", p.grad, gm[n], rtol, atol)


def _close(what, t, m, rtol, atol):
    a = t.detach().cpu().numpy()
    b = to_np(m)
    assert a.shape == b.shape, f"{what}: shapes {a.shape} vs {b.shape}"
    scale = max(float(np.abs(a).max()), 1e-12)
    err = float(np.abs(a - b).max())
    assert err <= atol + rtol * scale, f"{what}: max difference {err:.3g} (scale {scale:.3g})"
