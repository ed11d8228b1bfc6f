"""RWKV-6 "Finch" time mixing (Peng et al. 2024) as a pre-norm residual block.

Data-dependent token shift (a LoRA decides, per channel, how much of x_{t-1} each branch sees)::

    Δx_t = x_{t-1} - x_t;   m_{w,k,v,r,g} = tanh((x_t + μ_x ⊙ Δx_t) W_1) W_2,{w,k,v,r,g}
    x_*  = x_t + (μ_* + m_*) ⊙ Δx_t              for * in w, k, v, r, g
    r, k, v = W_r x_r, W_k x_k, W_v x_v;  g = SiLU(W_g x_g)
    w_t  = exp(-exp(d + tanh(x_w D_1) D_2))      data-dependent decay per key channel

and per head (key and value size N) the wkv recurrence with a bonus u for the current token::

    y_t = r_tᵀ (S_{t-1} + diag(u) k_t v_tᵀ);   S_t = diag(w_t) S_{t-1} + k_t v_tᵀ
    out = W_o (GroupNorm_heads(y) ⊙ g)

Defaults follow mad-lab's ``rwkv6-time-mixer`` config and its RWKV-LM-derived layer: head size
16, attention width d_model, GroupNorm eps 1e-5 · 8², token-shift LoRA rank 32, decay LoRA
rank 64, and the layer-dependent initialisation of μ, d and u from block_index / num_blocks.

Two forms of the wkv cell: :func:`wkv6_recurrent_reference` (step by step) and
:func:`wkv6_chunked` (the fast path: exact per-channel decays inside chunks, as in
``gated_linear_attention``, with the strict lower triangle plus the bonus on the diagonal).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from blocks.base import Block
from blocks.init import small_init_, wang_init_
from blocks.ops import decayed_scores
from blocks.registry import BlockError, register

BRANCHES = 5  # w, k, v, r, g


def wkv6_recurrent_reference(
    r: torch.Tensor, k: torch.Tensor, v: torch.Tensor, log_w: torch.Tensor, u: torch.Tensor
) -> torch.Tensor:
    """wkv cell, step by step. ``r, k, log_w: (B, H, S, N)``, ``v: (B, H, S, Nv)``,
    ``u: (H, N)``; returns ``y: (B, H, S, Nv)``; the state starts at zero."""
    batch, heads, seq, n = r.shape
    state = r.new_zeros(batch, heads, n, v.shape[-1])
    bonus = u[None, :, :, None]
    outs = []
    for t in range(seq):
        kv = k[:, :, t, :, None] * v[:, :, t, None]
        outs.append((r[:, :, t, :, None] * (state + bonus * kv)).sum(-2))
        state = log_w[:, :, t, :, None].exp() * state + kv
    return torch.stack(outs, dim=2)


def wkv6_chunked(
    r: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    log_w: torch.Tensor,
    u: torch.Tensor,
    chunk: int = 16,
    factored: bool | None = None,
) -> torch.Tensor:
    """wkv cell in chunked parallel form; same arguments and result as
    :func:`wkv6_recurrent_reference`, any sequence length. ``factored``: see
    :func:`blocks.ops.decayed_scores` (None: factored when the decays allow)."""
    batch, heads, seq, n = r.shape
    nv = v.shape[-1]
    num_chunks = -(-seq // chunk)
    pad = num_chunks * chunk - seq
    if pad:  # zero inputs and no decay after the end: earlier outputs are unchanged
        r, k, v, log_w = (F.pad(x, (0, 0, 0, pad)) for x in (r, k, v, log_w))
    r, k, log_w = (x.reshape(batch, heads, num_chunks, chunk, n) for x in (r, k, log_w))
    v = v.reshape(batch, heads, num_chunks, chunk, nv)
    b = log_w.cumsum(dim=3)  # decay from the chunk start through step t
    b_read = F.pad(b[:, :, :, :-1], (0, 0, 1, 0))  # ... through t - 1: what y_t sees

    # intra-chunk: s < t decays by exp(b_read_t - b_s); s = t uses the bonus u instead
    scores = decayed_scores(r, k, b_read, b, strict=True, factored=factored)
    out = scores @ v + (r * u[None, :, None, None] * k).sum(-1, keepdim=True) * v

    # inter-chunk: state entering each chunk, read through the decays since the chunk start
    b_last = b[:, :, :, -1:]
    chunk_kv = (k * (b_last - b).exp()).transpose(-1, -2) @ v  # (B, H, nC, N, Nv)
    chunk_decay = b_last.squeeze(3).exp().unsqueeze(-1)
    state = r.new_zeros(batch, heads, n, nv)
    entering = []
    for c in range(num_chunks):
        entering.append(state)
        state = chunk_decay[:, :, c] * state + chunk_kv[:, :, c]
    out = out + (r * b_read.exp()) @ torch.stack(entering, dim=2)
    return out.reshape(batch, heads, num_chunks * chunk, nv)[:, :, :seq]


@register("rwkv6")
class RWKV6Block(Block):
    """x + RWKV6TimeMix(LayerNorm(x)).

    Parameters: norm d + μ 6·d + token-shift LoRA 2·5·E1·d + decay d_0 A + decay LoRA
    E2·(d + A) + bonus A + r, k, v, g 4·d·A + out A·d + GroupNorm 2·A, with A = dim_att,
    E1 = time_mix_extra_dim, E2 = time_decay_extra_dim.
    """

    def __init__(
        self,
        d_model: int,
        max_len: int,
        *,
        block_index: int = 0,
        num_blocks: int = 1,
        head_dim: int = 16,
        dim_att: int | None = None,
        head_dim_divisor: int = 8,
        time_mix_extra_dim: int = 32,
        time_decay_extra_dim: int = 64,
        chunk_size: int = 16,
    ):
        super().__init__(d_model, max_len, block_index=block_index, num_blocks=num_blocks)
        dim_att = d_model if dim_att is None else dim_att
        if head_dim <= 0 or dim_att <= 0 or dim_att % head_dim:
            raise BlockError(
                f"rwkv6: dim_att {dim_att} must be a positive multiple of head_dim {head_dim}"
            )
        if time_mix_extra_dim <= 0 or time_decay_extra_dim <= 0 or head_dim_divisor <= 0:
            raise BlockError(
                "rwkv6: time_mix_extra_dim, time_decay_extra_dim and head_dim_divisor must be "
                f"positive, got {time_mix_extra_dim}, {time_decay_extra_dim}, {head_dim_divisor}"
            )
        if not isinstance(chunk_size, int) or chunk_size <= 0:
            raise BlockError(f"rwkv6: chunk_size must be a positive integer, got {chunk_size!r}")
        self.head_dim, self.dim_att, self.num_heads = head_dim, dim_att, dim_att // head_dim
        self.chunk_size = chunk_size
        d, A, E1, E2 = d_model, dim_att, time_mix_extra_dim, time_decay_extra_dim

        # RWKV-LM's layer-dependent init (mad-lab TimeMixer_RWKV6)
        r01 = block_index / (num_blocks - 1) if num_blocks > 1 else 0.0  # 0 -> 1 over depth
        r10 = 1.0 - block_index / num_blocks  # 1 -> almost 0 over depth
        ddd = (torch.arange(d, dtype=torch.float32) / d).view(1, 1, d)
        self.time_maa_x = nn.Parameter(1.0 - ddd.pow(r10))
        self.time_maa_w = nn.Parameter(1.0 - ddd.pow(r10))
        self.time_maa_k = nn.Parameter(1.0 - ddd.pow(r10))
        self.time_maa_v = nn.Parameter(1.0 - (ddd.pow(r10) + 0.3 * r01))
        self.time_maa_r = nn.Parameter(1.0 - ddd.pow(0.5 * r10))
        self.time_maa_g = nn.Parameter(1.0 - ddd.pow(0.5 * r10))
        self.time_maa_w1 = nn.Parameter(torch.empty(d, BRANCHES * E1).uniform_(-1e-4, 1e-4))
        self.time_maa_w2 = nn.Parameter(torch.empty(BRANCHES, E1, d).uniform_(-1e-4, 1e-4))
        n = torch.arange(A, dtype=torch.float32) / max(A - 1, 1)
        self.time_decay = nn.Parameter((-6 + 5 * n.pow(0.7 + 1.3 * r01)).view(1, 1, A))
        self.time_decay_w1 = nn.Parameter(torch.empty(d, E2).uniform_(-1e-4, 1e-4))
        self.time_decay_w2 = nn.Parameter(torch.empty(E2, A).uniform_(-1e-4, 1e-4))
        zigzag = ((torch.arange(A) + 1) % 3 - 1).float() * 0.1
        self.time_faaaa = nn.Parameter((r01 * (1 - n) + zigzag).view(self.num_heads, head_dim))

        self.receptance = nn.Linear(d, A, bias=False)
        self.key = nn.Linear(d, A, bias=False)
        self.value = nn.Linear(d, A, bias=False)
        self.gate = nn.Linear(d, A, bias=False)
        self.output = nn.Linear(A, d, bias=False)
        self.ln_x = nn.GroupNorm(self.num_heads, A, eps=1e-5 * head_dim_divisor**2)
        for lin in (self.receptance, self.key, self.value, self.gate):
            small_init_(lin.weight, d)
        wang_init_(self.output.weight, d, num_blocks)

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        B, S, _ = x.shape
        return x.view(B, S, self.num_heads, self.head_dim).transpose(1, 2)

    def mix(self, x: torch.Tensor) -> torch.Tensor:
        B, S, d = x.shape
        dx = F.pad(x[:, :-1], (0, 0, 1, 0)) - x  # x_{t-1} - x_t, with x_{-1} = 0
        lora = torch.tanh((x + dx * self.time_maa_x) @ self.time_maa_w1)
        lora = torch.einsum("bsie,ied->ibsd", lora.view(B, S, BRANCHES, -1), self.time_maa_w2)
        mw, mk, mv, mr, mg = lora.unbind(0)
        xw = x + dx * (self.time_maa_w + mw)
        xk = x + dx * (self.time_maa_k + mk)
        xv = x + dx * (self.time_maa_v + mv)
        xr = x + dx * (self.time_maa_r + mr)
        xg = x + dx * (self.time_maa_g + mg)

        r, k, v = self.receptance(xr), self.key(xk), self.value(xv)
        g = F.silu(self.gate(xg))
        decay = self.time_decay + torch.tanh(xw @ self.time_decay_w1) @ self.time_decay_w2
        log_w = -torch.exp(decay)  # log w_t: w_t = exp(-exp(decay)) in (0, 1)
        y = wkv6_chunked(self._heads(r), self._heads(k), self._heads(v), self._heads(log_w),
                         self.time_faaaa, chunk=self.chunk_size)
        y = self.ln_x(y.transpose(1, 2).reshape(B * S, self.dim_att)).view(B, S, self.dim_att)
        return self.output(y * g)

    def state_size(self, seq_len: int) -> int:
        """One N × N wkv state per head plus the previous token for the shift: H·N² + d_model."""
        return self.num_heads * self.head_dim * self.head_dim + self.d_model
