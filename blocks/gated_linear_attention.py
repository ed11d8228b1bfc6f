"""Gated linear attention (GLA, Yang et al. 2023) as a pre-norm residual block.

Per head, with a data-dependent decay per key dimension::

    α_t = sigmoid(W_α2 W_α1 u_t + b_α) ^ (1/16)        (log α_t = logsigmoid(·) / 16)
    S_t = diag(α_t) S_{t-1} + k_t v_tᵀ                  (S is d_k × d_v)
    o_t = (q_t / √d_k)ᵀ S_t
    out = W_o (RMSNorm_head(o) ⊙ SiLU(W_g u))

Layout and defaults follow mad-lab's ``mh-gated-linear-attention`` config and its fla-derived
layer: 8 heads, expand_k = expand_v = 1, gate rank 16, gate logit normaliser 16, per-head RMSNorm
(eps 1e-5, one weight vector shared by the heads), swish output gate, Xavier-uniform weights with
gain 2^-2.5.

Two forms of the cell, same arguments and result:

- :func:`gla_recurrent_reference`: the recurrence above, one step at a time.
- :func:`gla_chunked`: the fast path. Inside a chunk of L steps the cumulative log decays
  b_t = Σ_{s≤t, same chunk} log α_s give the intra-chunk scores exactly,
  A_ts = Σ_k q_tk k_sk exp(b_tk - b_sk) for s ≤ t: one product (q e^b)(k e^-b)ᵀ while every
  |b| ≤ 40, else an L × L × d_k tensor, never a quotient of exponentials, so strong decays
  cannot overflow (:func:`blocks.ops.decayed_scores`); the state is carried across chunks with
  decays exp(b_L) and exp(b_L - b_s) ≤ 1.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from blocks.base import Block
from blocks.ops import decayed_scores
from blocks.registry import BlockError, register


def gla_recurrent_reference(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, log_alpha: torch.Tensor
) -> torch.Tensor:
    """GLA cell, step by step. ``q, k, log_alpha: (B, H, S, dk)``, ``v: (B, H, S, dv)``;
    returns ``o: (B, H, S, dv)``; queries are scaled by dk^-1/2; the state starts at zero."""
    batch, heads, seq, dk = q.shape
    state = q.new_zeros(batch, heads, dk, v.shape[-1])
    outs = []
    for t in range(seq):
        state = log_alpha[:, :, t, :, None].exp() * state + k[:, :, t, :, None] * v[:, :, t, None]
        outs.append(((q[:, :, t, :, None] * dk**-0.5) * state).sum(-2))
    return torch.stack(outs, dim=2)


def gla_chunked(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    log_alpha: torch.Tensor,
    chunk: int = 16,
    factored: bool | None = None,
) -> torch.Tensor:
    """GLA cell in chunked parallel form; same arguments and result as
    :func:`gla_recurrent_reference`, any sequence length. ``factored``: see
    :func:`blocks.ops.decayed_scores` (None: factored when the decays allow)."""
    batch, heads, seq, dk = q.shape
    dv = v.shape[-1]
    num_chunks = -(-seq // chunk)
    pad = num_chunks * chunk - seq
    if pad:  # zero keys, queries and values, no decay: the padded steps change nothing before them
        q, k, v, log_alpha = (F.pad(x, (0, 0, 0, pad)) for x in (q, k, v, log_alpha))
    q, k, log_alpha = (x.reshape(batch, heads, num_chunks, chunk, dk) for x in (q, k, log_alpha))
    v = v.reshape(batch, heads, num_chunks, chunk, dv)
    q = q * dk**-0.5
    b = log_alpha.cumsum(dim=3)  # log decay from the chunk start up to and including step t

    # intra-chunk: decays exp(b_t - b_s) for s <= t, per key dimension
    scores = decayed_scores(q, k, b, b, factored=factored)  # (B, H, nC, L, L)
    out = scores @ v

    # inter-chunk: state entering each chunk, read by the queries decayed from the chunk start
    b_last = b[:, :, :, -1:]
    chunk_kv = (k * (b_last - b).exp()).transpose(-1, -2) @ v  # (B, H, nC, dk, dv)
    chunk_decay = b_last.squeeze(3).exp().unsqueeze(-1)  # (B, H, nC, dk, 1)
    state = q.new_zeros(batch, heads, dk, dv)
    entering = []
    for c in range(num_chunks):
        entering.append(state)
        state = chunk_decay[:, :, c] * state + chunk_kv[:, :, c]
    out = out + (q * b.exp()) @ torch.stack(entering, dim=2)
    return out.reshape(batch, heads, num_chunks * chunk, dv)[:, :, :seq]


@register("gated_linear_attention")
class GatedLinearAttentionBlock(Block):
    """x + GLA(LayerNorm(x)).

    Parameters: norm d + q, k: 2·d·K + v, g: 2·d·V + gate d·r + r·K + K + out V·d + RMSNorm V/H,
    with K = expand_k·d, V = expand_v·d, r = gate_low_rank_dim, H = num_heads.
    """

    def __init__(
        self,
        d_model: int,
        max_len: int,
        *,
        block_index: int = 0,
        num_blocks: int = 1,
        num_heads: int = 8,
        expand_k: float = 1.0,
        expand_v: float = 1.0,
        gate_low_rank_dim: int = 16,
        gate_logit_normalizer: float = 16.0,
        norm_eps: float = 1e-5,
        chunk_size: int = 16,
    ):
        super().__init__(d_model, max_len, block_index=block_index, num_blocks=num_blocks)
        key_dim, value_dim = int(d_model * expand_k), int(d_model * expand_v)
        if num_heads <= 0 or key_dim <= 0 or value_dim <= 0 or key_dim % num_heads \
                or value_dim % num_heads:
            raise BlockError(
                f"gated_linear_attention: key dim {key_dim} and value dim {value_dim} must be "
                f"positive multiples of num_heads {num_heads}"
            )
        if gate_low_rank_dim <= 0 or gate_logit_normalizer <= 0:
            raise BlockError(
                "gated_linear_attention: gate_low_rank_dim and gate_logit_normalizer must be "
                f"positive, got {gate_low_rank_dim}, {gate_logit_normalizer}"
            )
        if not isinstance(chunk_size, int) or chunk_size <= 0:
            raise BlockError(
                f"gated_linear_attention: chunk_size must be a positive integer, got {chunk_size!r}"
            )
        self.num_heads, self.key_dim, self.value_dim = num_heads, key_dim, value_dim
        self.head_k_dim, self.head_v_dim = key_dim // num_heads, value_dim // num_heads
        self.gate_logit_normalizer, self.norm_eps = gate_logit_normalizer, norm_eps
        self.chunk_size = chunk_size

        self.q_proj = nn.Linear(d_model, key_dim, bias=False)
        self.k_proj = nn.Linear(d_model, key_dim, bias=False)
        self.v_proj = nn.Linear(d_model, value_dim, bias=False)
        self.g_proj = nn.Linear(d_model, value_dim, bias=False)
        self.gk_proj = nn.Sequential(
            nn.Linear(d_model, gate_low_rank_dim, bias=False),
            nn.Linear(gate_low_rank_dim, key_dim, bias=True),
        )
        self.o_proj = nn.Linear(value_dim, d_model, bias=False)
        self.g_norm_weight = nn.Parameter(torch.ones(self.head_v_dim))
        # mad-lab / fla GLA init: Xavier uniform, gain 2^-2.5, on every weight matrix
        for lin in (self.q_proj, self.k_proj, self.v_proj, self.g_proj, self.o_proj,
                    self.gk_proj[0], self.gk_proj[1]):
            nn.init.xavier_uniform_(lin.weight, gain=2**-2.5)

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        B, S, _ = x.shape
        return x.view(B, S, self.num_heads, -1).transpose(1, 2)

    def mix(self, x: torch.Tensor) -> torch.Tensor:
        B, S, _ = x.shape
        q, k, v = (self._heads(proj(x)) for proj in (self.q_proj, self.k_proj, self.v_proj))
        log_alpha = self._heads(F.logsigmoid(self.gk_proj(x)) / self.gate_logit_normalizer)
        o = gla_chunked(q, k, v, log_alpha, chunk=self.chunk_size).transpose(1, 2)  # (B,S,H,dv)
        o = o * torch.rsqrt(o.square().mean(-1, keepdim=True) + self.norm_eps) * self.g_norm_weight
        o = o.reshape(B, S, self.value_dim) * F.silu(self.g_proj(x))
        return self.o_proj(o)

    def state_size(self, seq_len: int) -> int:
        """One d_k × d_v state per head: num_heads · head_k_dim · head_v_dim."""
        return self.num_heads * self.head_k_dim * self.head_v_dim
