"""The MLX twin contract: what every MLX block shares with its torch block.

A twin is an ``mlx.nn.Module`` built as ``Cls(d_model, max_len, block_index=0, num_blocks=1,
**options)`` exactly like its torch block, with the torch block's parameter names and shapes (a
torch ``state_dict()`` loads with ``twin.load_weights(list_of_(name, mx.array)), strict=True)``),
the same initialisation (the same distributions, drawn from MLX's RNG) and the same maths.

Options are checked, and derived sizes (head dims, hidden widths) computed, by the torch block
itself, built on torch's meta device (no memory, no data): a twin never disagrees with its torch
block about what an option means or which options are valid, and :meth:`Block.state_size` is the
torch block's own. Weight layouts that MLX stores differently (its convolutions keep channels
last) stay in torch's layout as plain parameters and are rearranged in the forward pass.
"""

from __future__ import annotations

import math
from typing import Any

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten

from blocks.registry import get as _get_block

# Attribute values copied from the torch reference block onto its twin (sizes, flags, names).
_PLAIN = (bool, int, float, str, type(None))


def torch_reference(name: str, d_model: int, max_len: int, **options: Any):
    """The torch block ``name`` built on the meta device: it validates ``options`` (raising the
    same one-line :class:`~blocks.base.BlockError` a torch build would) and holds the derived
    sizes, without allocating a weight."""
    import torch

    with torch.device("meta"):
        return _get_block(name, "torch")(d_model, max_len, **options)


class Block(nn.Module):
    """Pre-norm residual block: ``x + mix(LayerNorm(x))``; twin of :class:`blocks.base.Block`.

    ``torch_name`` names the torch block this class mirrors. After ``super().__init__`` the twin
    has every plain attribute of the torch block (``self.head_dim``, ``self.hidden``...) and
    ``self.norm``; subclasses then create their parameters and implement :meth:`mix` (or
    ``__call__`` for blocks with more than one residual branch).
    """

    torch_name: str = ""

    def __init__(self, d_model: int, max_len: int, *, block_index: int = 0, num_blocks: int = 1,
                 **options: Any):
        super().__init__()
        ref = torch_reference(self.torch_name, d_model, max_len, block_index=block_index,
                              num_blocks=num_blocks, **options)
        for key, value in vars(ref).items():
            if key.startswith("_") or hasattr(type(self), key):  # e.g. nn.Module.training
                continue
            if isinstance(value, _PLAIN):
                setattr(self, key, value)
            elif isinstance(value, tuple) and all(isinstance(v, _PLAIN) for v in value):
                object.__setattr__(self, key, value)  # a plain attribute, not a child module
        object.__setattr__(self, "_reference", ref)
        self.norm = nn.LayerNorm(d_model, bias=False)

    def mix(self, x: mx.array) -> mx.array:  # pragma: no cover - abstract
        raise NotImplementedError

    def __call__(self, x: mx.array) -> mx.array:
        return x + self.mix(self.norm(x))

    def num_params(self) -> int:
        """Number of trainable parameters (the torch block's count)."""
        return sum(v.size for _, v in tree_flatten(self.trainable_parameters()))

    def state_size(self, seq_len: int) -> int:
        """Floats of recurrent state per sequence at inference: the torch block's own answer."""
        return self._reference.state_size(seq_len)


# --- initialisations (blocks.init's, drawn from MLX's RNG) -----------------------------------

def normal(shape: tuple[int, ...], std: float, mean: float = 0.0) -> mx.array:
    return mean + std * mx.random.normal(shape)


def uniform(shape: tuple[int, ...], bound: float) -> mx.array:
    return mx.random.uniform(-bound, bound, shape)


def small_init(shape: tuple[int, ...], dim: int) -> mx.array:
    """N(0, sqrt(2 / (5 dim))) (Nguyen & Salazar 2019), as :func:`blocks.init.small_init_`."""
    return normal(shape, math.sqrt(2.0 / (5.0 * dim)))


def wang_init(shape: tuple[int, ...], dim: int, num_blocks: int) -> mx.array:
    """N(0, 2 / (num_blocks sqrt(dim))), as :func:`blocks.init.wang_init_`."""
    return normal(shape, 2.0 / (max(num_blocks, 1) * math.sqrt(dim)))


def linear(in_dim: int, out_dim: int, bias: bool = True) -> nn.Linear:
    """An ``nn.Linear`` with torch's default initialisation U(-1/sqrt(in), 1/sqrt(in)) for both
    weight and bias (MLX's default is the same; written out so it cannot drift)."""
    layer = nn.Linear(in_dim, out_dim, bias=bias)
    bound = 1.0 / math.sqrt(in_dim)
    layer.weight = uniform((out_dim, in_dim), bound)
    if bias:
        layer.bias = uniform((out_dim,), bound)
    return layer


def conv_weight(channels: int, kernel: int, bias: bool = True) -> tuple[mx.array, mx.array | None]:
    """A depthwise conv's weight in torch's layout (C, 1, K) and bias (C,), with nn.Conv1d's
    default initialisation U(-1/sqrt(K), 1/sqrt(K))."""
    bound = 1.0 / math.sqrt(kernel)
    return uniform((channels, 1, kernel), bound), uniform((channels,), bound) if bias else None
