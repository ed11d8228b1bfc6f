"""Mixture-of-experts MLP (token-choice top-k routing, Shazeer et al. 2017 / Switch Transformer,
Fedus et al. 2021) as a pre-norm residual block.

For each token u (router W_r, experts e = 1..E, k of them active)::

    p = softmax(W_r u + b_r);  T = top-k(p);  gate_e = p_e / Σ_{j∈T} p_j  for e ∈ T, else 0
    out = Σ_{e∈T} gate_e · W_down,e (W_a,e u ⊙ GELU_tanh(W_b,e u))

The experts are mad-lab's gated MLPs (``MoeMlp``: product of a linear path and a tanh-GELU
path); defaults follow its ``moe-mlp`` config: 8 experts, 2 active, no bias, expert width 16 at
d_model 128 (here d_model / 8, so it scales with the model). Unlike mad-lab (whose dense
``down1`` mixes all experts and whose softmax also weights the unchosen ones), each token's
output is exactly the gate-weighted sum of its k chosen experts.

Load balancing (Switch Transformer): with f_e the fraction of the N·k token-to-expert
assignments that went to expert e and P_e the mean router probability of e over the N tokens,
``aux = E · Σ_e f_e P_e`` (1 when perfectly balanced). Each forward pass leaves
``aux_loss_weight · aux`` on ``self.aux_loss``; the trainer adds it to the loss.

Dispatch is dense (every expert runs on every token, unchosen results get weight 0): at these
widths that is cheaper than gathering tokens per expert, and the result is the same.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from blocks.base import Block
from blocks.init import small_init_, wang_init_
from blocks.registry import BlockError, register


@register("moe_mlp")
class MoEMLPBlock(Block):
    """x + MoE(LayerNorm(x)); a channel mixer with a load-balancing auxiliary loss.

    Parameters: norm d + router d·E + E + experts E·(3·d·m) (+ E·(2m + d) with bias),
    with E = num_experts, m = dim_inner.
    """

    def __init__(
        self,
        d_model: int,
        max_len: int,
        *,
        block_index: int = 0,
        num_blocks: int = 1,
        num_experts: int = 8,
        active_experts: int = 2,
        dim_inner: int | None = None,
        bias: bool = False,
        aux_loss_weight: float = 0.01,
    ):
        super().__init__(d_model, max_len, block_index=block_index, num_blocks=num_blocks)
        if not isinstance(num_experts, int) or num_experts <= 0:
            raise BlockError(f"moe_mlp: num_experts must be a positive int, got {num_experts!r}")
        if not isinstance(active_experts, int) or not 0 < active_experts <= num_experts:
            raise BlockError(
                f"moe_mlp: active_experts must be in 1..num_experts ({num_experts}), "
                f"got {active_experts!r}"
            )
        dim_inner = max(1, d_model // 8) if dim_inner is None else dim_inner
        if not isinstance(dim_inner, int) or dim_inner <= 0:
            raise BlockError(f"moe_mlp: dim_inner must be a positive integer, got {dim_inner!r}")
        if aux_loss_weight < 0:
            raise BlockError(f"moe_mlp: aux_loss_weight must be >= 0, got {aux_loss_weight}")
        self.num_experts, self.active_experts = num_experts, active_experts
        self.dim_inner = dim_inner
        self.aux_loss_weight = aux_loss_weight

        self.router = nn.Linear(d_model, num_experts)
        self.up = nn.Parameter(torch.empty(num_experts, d_model, 2 * dim_inner))
        self.down = nn.Parameter(torch.empty(num_experts, dim_inner, d_model))
        self.up_bias = nn.Parameter(torch.zeros(num_experts, 2 * dim_inner)) if bias else None
        self.down_bias = nn.Parameter(torch.zeros(num_experts, d_model)) if bias else None
        small_init_(self.router.weight, d_model)
        nn.init.zeros_(self.router.bias)
        small_init_(self.up, d_model)
        wang_init_(self.down, d_model, num_blocks)
        self.aux_loss: torch.Tensor | None = None

    def route(self, u: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Router probabilities (N, E), chosen experts (N, k), their renormalised gates (N, k)."""
        probs = self.router(u).softmax(dim=-1)
        top_p, top_i = probs.topk(self.active_experts, dim=-1)
        return probs, top_i, top_p / top_p.sum(-1, keepdim=True)

    def experts(self, u: torch.Tensor) -> torch.Tensor:
        """Every expert on every token: (N, d) -> (E, N, d)."""
        hidden = torch.einsum("nd,edf->enf", u, self.up)
        if self.up_bias is not None:
            hidden = hidden + self.up_bias[:, None]
        lin, gate = hidden.chunk(2, dim=-1)
        out = torch.einsum("enf,efd->end", lin * F.gelu(gate, approximate="tanh"), self.down)
        return out if self.down_bias is None else out + self.down_bias[:, None]

    def mix(self, x: torch.Tensor) -> torch.Tensor:
        u = x.reshape(-1, self.d_model)
        probs, top_i, gates = self.route(u)
        weights = torch.zeros_like(probs).scatter(1, top_i, gates)  # (N, E), k nonzeros per row
        out = torch.einsum("ne,end->nd", weights, self.experts(u))

        counts = torch.zeros_like(probs).scatter_add_(1, top_i, torch.ones_like(gates)).sum(0)
        fraction = counts / top_i.numel()  # f_e: share of the N·k assignments
        balance = self.num_experts * (fraction * probs.mean(0)).sum()
        self.aux_loss = self.aux_loss_weight * balance
        return out.view_as(x)

    def __getstate__(self):
        # the last aux_loss is bound to that forward's graph and cannot be deep-copied; copies
        # (copy.deepcopy, pickle) start without one
        state = self.__dict__.copy()
        state["aux_loss"] = None
        return state

    def state_size(self, seq_len: int) -> int:
        """No recurrent state."""
        return 0
