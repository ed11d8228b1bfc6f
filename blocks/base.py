"""The block contract every registered block type follows.

A block maps ``(batch, seq, d_model) -> (batch, seq, d_model)``, is causal, and is a complete
residual block: ``forward(x)`` returns ``x + mix(norm(x))`` (plus any sub-blocks it owns, e.g. the
sLSTM block's feed-forward). The model is therefore just embedding -> blocks -> final norm -> head.
"""

from __future__ import annotations

import torch
from torch import nn

from mad_search.errors import UserError


class BlockError(UserError):
    """A block name, option or registration that cannot be honoured (a user error)."""


class Block(nn.Module):
    """Pre-norm residual block: ``x + mix(LayerNorm(x))``.

    Subclasses implement :meth:`mix` and :meth:`state_size`. Blocks that need more than one
    residual branch (the sLSTM block with its feed-forward) override :meth:`forward` instead.

    Every block is constructed as ``Cls(d_model, max_len, *, block_index=0, num_blocks=1, **kw)``;
    ``block_index`` / ``num_blocks`` let depth-dependent initialisations (xLSTM) see the stack.
    """

    def __init__(self, d_model: int, max_len: int, *, block_index: int = 0, num_blocks: int = 1):
        super().__init__()
        self.d_model = d_model
        self.max_len = max_len
        self.block_index = block_index
        self.num_blocks = num_blocks
        self.norm = nn.LayerNorm(d_model, bias=False)

    def mix(self, x: torch.Tensor) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.mix(self.norm(x))

    def num_params(self) -> int:
        """Number of trainable parameters of this block."""
        return sum(p.numel() for p in self.parameters() if p.requires_grad)

    def state_size(self, seq_len: int) -> int:
        """Floats of recurrent state per sequence at inference (zoology's convention)."""
        return 0
