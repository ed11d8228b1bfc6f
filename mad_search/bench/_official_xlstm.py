"""Build the official xLSTM blocks (NX-AI/xlstm 2.0.x, pip ``xlstm``) at our sizes, on CPU.

Only for side-by-side timing in the blocks benchmark. The package's CPU paths are pure PyTorch:

- ``mlstm``: ``xlstm.mLSTMBlock`` (pre-LayerNorm, up-projection factor 2, causal conv, headwise
  q/k/v blocks of 4, mLSTM cell, learnable skip, output gate, down-projection). In 2.0.x its
  ``mLSTMCell`` always runs ``parallel_stabilized_simple`` (the quadratic parallel form).
- ``slstm``: ``xlstm.sLSTMBlock`` with ``backend="vanilla"`` (a Python loop over time) plus its
  gated GELU feed-forward (proj_factor 1.3), float32.

Install without the package's CUDA-oriented dependencies (see requirements/bench.txt):
``pip install --no-deps xlstm==2.0.6``; importing the two blocks needs only torch and packaging.
"""

from __future__ import annotations

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
