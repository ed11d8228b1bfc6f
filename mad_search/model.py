"""The model around a layer sequence: embedding -> blocks -> final norm -> untied head.

Blocks are complete pre-norm residual blocks (see ``blocks/base.py``), so a forward pass reads
top to bottom in :meth:`SequenceModel.forward`. :class:`EncoderDecoder` is the variant mad-lab uses
for the compression task: encode the whole sequence with the blocks, pool the last position, and
reconstruct every position with a small MLP decoder fed sinusoidal positions.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING

import torch
from torch import nn

import blocks
from blocks.init import small_init_

if TYPE_CHECKING:
    from mad_search.plan import RunPlan


def block_list(
    layers: Sequence[str],
    d_model: int,
    max_len: int,
    block_options: Mapping[str, Mapping] | None = None,
    backend: str = "torch",
) -> list:
    """One block per name in ``layers`` (torch blocks or their MLX twins); ``block_options[name]``
    are passed to that block type, and its place in the stack to types that take it."""
    block_options = block_options or {}
    out = []
    for i, name in enumerate(layers):
        opts = dict(block_options.get(name, {}) or {})
        cls = blocks.get(name, backend)
        params = inspect.signature(cls).parameters
        takes_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
        for key, value in (("block_index", i), ("num_blocks", len(layers))):
            if takes_any or key in params:
                opts.setdefault(key, value)
        out.append(blocks.build(name, d_model, max_len, backend=backend, **opts))
    return out


def build_blocks(
    layers: Sequence[str],
    d_model: int,
    max_len: int,
    block_options: Mapping[str, Mapping] | None = None,
) -> nn.ModuleList:
    """The torch blocks of ``layers`` (see :func:`block_list`)."""
    return nn.ModuleList(block_list(layers, d_model, max_len, block_options))


class SequenceModel(nn.Module):
    """Causal sequence model over a layer list; logits for every position."""

    def __init__(
        self,
        vocab_size: int,
        d_model: int,
        layers: Sequence[str],
        max_len: int,
        block_options: Mapping[str, Mapping] | None = None,
        sparse_embedding: bool = False,
    ):
        super().__init__()
        self.layers = list(layers)
        self.embedding = nn.Embedding(vocab_size, d_model, sparse=sparse_embedding)
        self.blocks = build_blocks(self.layers, d_model, max_len, block_options)
        self.norm = nn.LayerNorm(d_model, bias=False)
        self.head = nn.Linear(d_model, vocab_size, bias=False)
        small_init_(self.embedding.weight, d_model)
        small_init_(self.head.weight, d_model)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        x = self.embedding(tokens)
        for block in self.blocks:
            x = block(x)
        return self.head(self.norm(x))

    def state_size(self, seq_len: int) -> int:
        """Total recurrent state of the stack, floats per sequence."""
        return sum(int(b.state_size(seq_len)) for b in self.blocks if hasattr(b, "state_size"))


def sinusoidal_positions(seq_len: int, dim: int) -> torch.Tensor:
    """Fixed sine/cosine position table (seq_len, dim), as in Vaswani et al. 2017."""
    pos = torch.arange(seq_len, dtype=torch.float32)[:, None]
    freq = torch.exp(torch.arange(0, dim, 2, dtype=torch.float32) * (-math.log(10000.0) / dim))
    table = torch.zeros(seq_len, dim)
    table[:, 0::2] = torch.sin(pos * freq)
    table[:, 1::2] = torch.cos(pos * freq[: dim // 2])
    return table


class EncoderDecoder(SequenceModel):
    """Compression: the blocks encode the sequence into one vector; an MLP decodes each position.

    The encoder is the same causal stack, so the last position has read the whole input; the
    decoder is mad-lab's non-expanding MLP (norm, linear, GELU, twice) over encoding + position.
    """

    def __init__(self, vocab_size: int, d_model: int, layers: Sequence[str], max_len: int, **kw):
        super().__init__(vocab_size, d_model, layers, max_len, **kw)
        self.register_buffer("positions", sinusoidal_positions(max_len, d_model), persistent=False)
        self.decoder = nn.Sequential(
            nn.LayerNorm(d_model, bias=False),
            nn.Linear(d_model, d_model),
            nn.GELU(),
            nn.LayerNorm(d_model, bias=False),
            nn.Linear(d_model, d_model),
            nn.GELU(),
        )
        self.dec_norm = nn.LayerNorm(d_model, bias=False)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        x = self.embedding(tokens)
        for block in self.blocks:
            x = block(x)
        code = self.norm(x[:, -1])  # (B, D): pooled at the last position
        dec = self.decoder(code[:, None, :] + self.positions[: tokens.shape[1]])
        return self.head(self.dec_norm(dec))


def aux_loss(model: nn.Module) -> torch.Tensor | None:
    """Sum of the auxiliary losses blocks left on ``self.aux_loss`` in their last forward pass
    (e.g. a mixture-of-experts load-balancing loss, already weighted by the block)."""
    total = None
    for module in model.modules():
        value = getattr(module, "aux_loss", None)
        if isinstance(value, torch.Tensor):
            total = value if total is None else total + value
    return total


def count_params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters() if p.requires_grad)


def build_model(plan: RunPlan) -> SequenceModel:
    """The model of a run plan (an encoder-decoder for the compression task), initialised from
    torch's global RNG: seed it first."""
    cls = EncoderDecoder if plan.task_info.encoder_decoder else SequenceModel
    return cls(
        plan.task_info.vocab_size,
        plan.d_model,
        plan.layers,
        plan.task_info.seq_len,
        block_options=plan.block_options,
        sparse_embedding=plan.sparse_embedding,
    )
