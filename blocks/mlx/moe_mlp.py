"""MLX twin of :mod:`blocks.moe_mlp`: a mixture-of-experts MLP with token-choice top-k routing
(Shazeer et al. 2017; Switch Transformer, Fedus et al. 2021). For each token u::

    p = softmax(W_r u + b_r);  T = top-k(p);  gate_e = p_e / Σ_{j∈T} p_j  (e ∈ T, else 0)
    out = Σ_{e∈T} gate_e · W_down,e (W_a,e u ⊙ GELU_tanh(W_b,e u))

Dispatch is dense, as in the torch block: every expert runs on every token and the unchosen
results get weight 0.

Load balancing (Switch Transformer): f_e is the share of the N·k token-to-expert assignments that
went to expert e, P_e the mean router probability of e over the N tokens, and each call leaves
``aux_loss = aux_loss_weight · E · Σ_e f_e P_e`` on ``self.aux_loss`` (an ``mx.array`` kept as a
plain attribute, not a parameter), as the torch block does. f_e counts discrete choices and carries
no gradient; P_e does. An MLX training step adds ``block.aux_loss`` inside the function it
differentiates, after the forward pass that set it (the value belongs to that call's graph).
"""

from __future__ import annotations

import math

import mlx.core as mx
import mlx.nn as nn

from blocks.mlx.base import Block, small_init, wang_init
from blocks.registry import register


def gelu_tanh(x: mx.array) -> mx.array:
    """GELU, tanh approximation (torch's ``approximate="tanh"``):
    ½ x (1 + tanh(√(2/π) (x + 0.044715 x³)))."""
    return 0.5 * x * (1.0 + mx.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x * x * x)))


@register("moe_mlp", backend="mlx")
class MoEMLPBlock(Block):
    """x + MoE(LayerNorm(x)); a channel mixer with a load-balancing auxiliary loss."""

    torch_name = "moe_mlp"

    def __init__(self, d_model: int, max_len: int, **options):
        super().__init__(d_model, max_len, **options)
        E, m = self.num_experts, self.dim_inner
        self.router = nn.Linear(d_model, E)
        self.router.weight = small_init((E, d_model), d_model)
        self.router.bias = mx.zeros((E,))
        self.up = small_init((E, d_model, 2 * m), d_model)
        self.down = wang_init((E, m, d_model), d_model, self.num_blocks)
        if self._reference.up_bias is not None:
            self.up_bias = mx.zeros((E, 2 * m))
            self.down_bias = mx.zeros((E, d_model))
        self.aux_loss = None

    def __setattr__(self, key, value):
        if key == "aux_loss":  # a value of the last call, never a parameter
            object.__setattr__(self, key, value)
        else:
            super().__setattr__(key, value)

    def route(self, u: mx.array) -> tuple[mx.array, mx.array]:
        """Router probabilities (N, E) and the mask of each token's k chosen experts (N, E)."""
        probs = mx.softmax(self.router(u), axis=-1)
        k = self.active_experts
        top = mx.argpartition(-probs, kth=k - 1, axis=-1)[:, :k]  # (N, k), any order
        chosen = (top[:, :, None] == mx.arange(self.num_experts)).any(axis=1)
        return probs, chosen

    def experts(self, u: mx.array) -> mx.array:
        """Every expert on every token: (N, d) -> (E, N, d)."""
        hidden = u @ self.up  # (E, N, 2m)
        if self.up_bias is not None:
            hidden = hidden + self.up_bias[:, None]
        lin, gate = mx.split(hidden, 2, axis=-1)
        out = (lin * gelu_tanh(gate)) @ self.down
        return out if self.down_bias is None else out + self.down_bias[:, None]

    def mix(self, x: mx.array) -> mx.array:
        u = x.reshape(-1, self.d_model)
        probs, chosen = self.route(u)
        weights = mx.where(chosen, probs, 0.0)
        gates = weights / weights.sum(-1, keepdims=True)  # (N, E), k nonzeros per row
        out = mx.einsum("ne,end->nd", gates, self.experts(u))

        fraction = chosen.astype(probs.dtype).sum(0) / (u.shape[0] * self.active_experts)
        balance = self.num_experts * (fraction * probs.mean(0)).sum()
        self.aux_loss = self.aux_loss_weight * balance
        return out.reshape(x.shape)
