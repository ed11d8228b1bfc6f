"""Build the official xLSTM blocks (NX-AI/xlstm 2.0.x, pip ``xlstm``) at our sizes, on CPU.

For side-by-side timing in the blocks benchmark and for the equivalence tests. The package's CPU
paths are pure PyTorch:

- ``mlstm``: ``xlstm.mLSTMBlock`` (pre-LayerNorm, up-projection factor 2, causal conv, headwise
  q/k/v blocks of 4, mLSTM cell, learnable skip, output gate, down-projection). In 2.0.x its
  ``mLSTMCell`` always runs ``parallel_stabilized_simple`` (the quadratic parallel form).
- ``slstm``: ``xlstm.sLSTMBlock`` with ``backend="vanilla"`` (a Python loop over time) plus its
  gated GELU feed-forward (proj_factor 1.3), float32.

Install without the package's CUDA-oriented dependencies (see requirements/bench.txt):
``pip install --no-deps xlstm==2.0.6``; importing the two blocks needs only torch and packaging.

:func:`weight_map` / :func:`copy_weights` load an official block's weights into ours (the
equivalence tests in tests/test_mlstm.py and tests/test_slstm.py use them).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

NAMES = ("mlstm", "slstm")
"""Our block names that have an official counterpart here."""


def status() -> tuple[bool, str]:
    """(usable, description): the package version, or why it cannot be used."""
    try:
        import xlstm
        from xlstm import mLSTMBlock, sLSTMBlock  # noqa: F401
    except ImportError as exc:
        return False, f"not installed: {exc} (pip install --no-deps xlstm==2.0.6)"
    # A broken install (any error at import) must not stop the benchmark of our own blocks.
    except Exception as exc:  # noqa: BLE001
        return False, f"not importable: {type(exc).__name__}: {exc}"
    version = getattr(xlstm, "__version__", "unknown")
    return True, f"xlstm {version}"


def build(
    name: str, d_model: int, seq_len: int, *, num_heads: int = 4, conv_kernel: int = 4
) -> nn.Module:
    """The official ``name`` block (a full residual block, (B, S, D) -> (B, S, D), float32)."""
    from xlstm import (
        FeedForwardConfig,
        mLSTMBlock,
        mLSTMBlockConfig,
        mLSTMLayerConfig,
        sLSTMBlock,
        sLSTMBlockConfig,
        sLSTMLayerConfig,
    )

    if name == "mlstm":
        layer = mLSTMLayerConfig(
            embedding_dim=d_model,
            num_heads=num_heads,
            conv1d_kernel_size=conv_kernel,
            qkv_proj_blocksize=4,
            proj_factor=2.0,
            context_length=seq_len,
        )
        return mLSTMBlock(mLSTMBlockConfig(mlstm=layer, _num_blocks=1, _block_idx=0))
    if name == "slstm":
        layer = sLSTMLayerConfig(
            embedding_dim=d_model,
            num_heads=num_heads,
            conv1d_kernel_size=conv_kernel,
            backend="vanilla",
            dtype="float32",
        )
        ffn = FeedForwardConfig(proj_factor=1.3, act_fn="gelu")
        return sLSTMBlock(
            sLSTMBlockConfig(slstm=layer, feedforward=ffn, _num_blocks=1, _block_idx=0)
        )
    raise ValueError(f"no official block for {name!r}; have: {', '.join(NAMES)}")


def describe(name: str, block: nn.Module) -> dict:
    """The settings that matter for a fair comparison, read back from the built block."""
    layer = block.xlstm
    if name == "mlstm":
        cfg = layer.config
        return {
            "backend": layer.mlstm_cell.backend_fn.__name__,
            "num_heads": cfg.num_heads,
            "inner_dim": cfg._inner_embedding_dim,
            "conv_kernel": cfg.conv1d_kernel_size,
            "qkv_proj_blocksize": cfg.qkv_proj_blocksize,
        }
    cfg = layer.config
    return {
        "backend": cfg.backend,
        "num_heads": cfg.num_heads,
        "conv_kernel": cfg.conv1d_kernel_size,
        "ffn_dim": block.ffn.config._proj_up_dim,
        "ffn_act": block.ffn.config.act_fn,
    }


def state_size(name: str, block: nn.Module, seq_len: int) -> int:
    """Floats of recurrent state per sequence: cell states plus the conv's last kernel-1 inputs."""
    cfg = block.xlstm.config
    if name == "mlstm":
        inner, heads = cfg._inner_embedding_dim, cfg.num_heads
        head_dim = inner // heads
        cell = heads * (head_dim * head_dim + head_dim + 1)  # C, n, m per head
        return cell + (cfg.conv1d_kernel_size - 1) * inner
    cell = 4 * cfg.embedding_dim  # y (h), c, n, m per unit
    return cell + max(cfg.conv1d_kernel_size - 1, 0) * cfg.embedding_dim


def _same(t: torch.Tensor) -> torch.Tensor:
    return t


def _residual_norm_weight(t: torch.Tensor) -> torch.Tensor:
    """The official LayerNorm / MultiHeadLayerNorm apply ``1 + weight``; ours apply the weight."""
    return 1.0 + t


WeightMap = list[tuple[nn.Parameter, nn.Parameter, Callable[[torch.Tensor], torch.Tensor]]]


def weight_map(name: str, official: nn.Module, ours: nn.Module) -> WeightMap:
    """``(our parameter, official parameter, convert)`` for every parameter of ``ours``, where
    ``convert(official parameter)`` is our parameter's value. Each ``convert`` is affine: the
    identity, a layout change, or ``1 + w`` for the official norms' weights.

    ``official`` is :func:`build`'s block for ``name``, ``ours`` our block of the same sizes.
    """
    layer = official.xlstm
    pairs: WeightMap = [(ours.norm.weight, official.xlstm_norm.weight, _residual_norm_weight)]
    if name == "mlstm":
        cell = layer.mlstm_cell
        pairs += [
            (ours.proj_up.weight, layer.proj_up.weight, _same),
            (ours.conv1d.weight, layer.conv1d.conv.weight, _same),
            (ours.conv1d.bias, layer.conv1d.conv.bias, _same),
            (ours.q_proj.weight, layer.q_proj.weight, _same),
            (ours.k_proj.weight, layer.k_proj.weight, _same),
            (ours.v_proj.weight, layer.v_proj.weight, _same),
            (ours.igate.weight, cell.igate.weight, _same),
            (ours.igate.bias, cell.igate.bias, _same),
            (ours.fgate.weight, cell.fgate.weight, _same),
            (ours.fgate.bias, cell.fgate.bias, _same),
            (ours.learnable_skip, layer.learnable_skip, _same),
            (ours.proj_down.weight, layer.proj_down.weight, _same),
            (ours.outnorm_weight, cell.outnorm.weight, _residual_norm_weight),
        ]
    elif name == "slstm":
        cell = layer.slstm_cell
        if ours.conv_kernel > 0:
            pairs += [
                (ours.conv.weight, layer.conv1d.conv.weight, _same),
                (ours.conv.bias, layer.conv1d.conv.bias, _same),
            ]

        def recurrent_kernel(t: torch.Tensor) -> torch.Tensor:
            # the cell's internal layout -> (head, in, gate, out), which is also ours
            return cell._recurrent_kernel_int2ext(t)

        def bias(t: torch.Tensor) -> torch.Tensor:
            # internal layout -> the official (head, gate, unit) -> ours (gate, head, unit)
            return cell._bias_int2ext(t).permute(1, 0, 2)

        pairs += [
            # sLSTMLayer.forward computes ``i, f, z, o = fgate(x_c), igate(x_c), zgate(x),
            # ogate(x)``: the module named ``fgate`` gives the input gate, ``igate`` the forget
            # gate. The cell's recurrent kernel and bias use the order i, f, z, o as ours.
            (ours.w_i, layer.fgate.weight, _same),
            (ours.w_f, layer.igate.weight, _same),
            (ours.w_z, layer.zgate.weight, _same),
            (ours.w_o, layer.ogate.weight, _same),
            (ours.R, cell._recurrent_kernel_, recurrent_kernel),
            (ours.b, cell._bias_, bias),
            (ours.group_norm_weight, layer.group_norm.weight, _residual_norm_weight),
            (ours.ffn_norm.weight, official.ffn_norm.weight, _residual_norm_weight),
            # both FFNs split their up-projection as [gate | up]
            (ours.ffn_up.weight, official.ffn.proj_up.weight, _same),
            (ours.ffn_down.weight, official.ffn.proj_down.weight, _same),
        ]
    else:
        raise ValueError(f"no official block for {name!r}; have: {', '.join(NAMES)}")
    _check_covers(name, pairs, official, ours)
    return pairs


def _check_covers(name: str, pairs: WeightMap, official: nn.Module, ours: nn.Module) -> None:
    """Every parameter on each side appears exactly once, and the shapes agree."""
    for side, module, mapped in (("ours", ours, 0), ("official", official, 1)):
        got = [id(pair[mapped]) for pair in pairs]
        if len(got) != len(set(got)) or set(got) != {id(p) for p in module.parameters()}:
            raise ValueError(f"{name}: the weight map does not cover {side} parameters once each")
    for mine, theirs, convert in pairs:
        if convert(theirs.detach()).shape != mine.shape:
            raise ValueError(f"{name}: {tuple(theirs.shape)} -> {tuple(mine.shape)} in the map")


@torch.no_grad()
def copy_weights(name: str, official: nn.Module, ours: nn.Module) -> None:
    """Load the official block's weights into ours (same sizes): afterwards both compute the same
    function of their input."""
    for mine, theirs, convert in weight_map(name, official, ours):
        mine.copy_(convert(theirs))
