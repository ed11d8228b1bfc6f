"""Causal multi-head linear attention (Katharopoulos et al. 2020) as a pre-norm residual block.

Per head, with feature maps φ_q, φ_k applied to the head's query and key::

    o_t = Σ_{s≤t} (φ_q(q_t)·φ_k(k_s)) v_s / (φ_q(q_t)·Σ_{s≤t} φ_k(k_s) + ε)
    out = W_o [o^(1); …; o^(H)]

Defaults follow mad-lab's ``mh-linear-attention`` config (16 heads, expand_k = expand_v = 1, no
q/k normalisation, the normaliser above with ε = 1e-12) except the feature map: ours defaults to
``elu`` (elu + 1, Katharopoulos et al.). mad-lab's ``elementwise_product`` map (φ(x) =
(W_1 x + b_1) ⊙ (W_2 x + b_2), learned per head dimension and shared by the heads, separate maps
for q and k) is signed, so the normaliser can pass near zero: at init (d_model 64, 16 heads, seq
256) about 3 in 10,000 denominators are below 1e-3 and the float32 output there differs from
float64 by up to ~1e3. It stays available (``feature_map=elementwise_product``), as do ``relu``,
``identity`` and ``taylor`` (Based's second-order Taylor map, φ(q)·φ(k) = 1 + q·k/√d +
(q·k)²/2d); a positive map keeps the normaliser well away from zero (agreement with float64 to
~1e-5), and ``normalize=False`` drops it.

Two forms, same result: :func:`linear_attention_quadratic` (mad-lab's masked S × S form, the
reference) and :func:`linear_attention_chunked` (the fast path: masked products inside chunks,
a running sum of φ(k)ᵀv between chunks).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from blocks.base import Block
from blocks.init import small_init_, wang_init_
from blocks.registry import BlockError, register

FEATURE_MAPS = ("elementwise_product", "elu", "relu", "identity", "taylor")


def taylor_features(x: torch.Tensor) -> torch.Tensor:
    """[1, x/d^¼, x_i²/(√2 √d), x_i x_j/√d for i < j]: φ(q)·φ(k) = 1 + q·k/√d + (q·k)²/(2d)."""
    d = x.shape[-1]
    rows, cols = torch.triu_indices(d, d, offset=1, device=x.device)
    outer = x.unsqueeze(-1) * x.unsqueeze(-2)
    return torch.cat([
        torch.ones_like(x[..., :1]),
        x / d**0.25,
        x.square() / math.sqrt(2 * d),
        outer[..., rows, cols] / math.sqrt(d),
    ], dim=-1)


class HadamardFeatureMap(nn.Module):
    """φ(x) = (W_1 x + b_1) ⊙ (W_2 x + b_2) on one head's vector (mad-lab's elementwise_product)."""

    def __init__(self, head_dim: int):
        super().__init__()
        self.layer1 = nn.Linear(head_dim, head_dim)
        self.layer2 = nn.Linear(head_dim, head_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layer1(x) * self.layer2(x)


def feature_dim(feature_map: str, head_dim: int) -> int:
    """Length of φ(x) for a head of size ``head_dim``."""
    return 1 + head_dim + head_dim * (head_dim + 1) // 2 if feature_map == "taylor" else head_dim


def linear_attention_quadratic(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, eps: float = 1e-12, normalize: bool = True
) -> torch.Tensor:
    """Reference form on features: ``q, k: (B, H, S, F)``, ``v: (B, H, S, dv)`` -> (B, H, S, dv)."""
    scores = (q @ k.transpose(-1, -2)).tril()
    out = scores @ v
    if normalize:
        out = out / ((q * k.cumsum(2)).sum(-1, keepdim=True) + eps)
    return out


def linear_attention_chunked(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    eps: float = 1e-12,
    normalize: bool = True,
    chunk: int = 64,
) -> torch.Tensor:
    """Same result as :func:`linear_attention_quadratic` in O(S · chunk) time and memory."""
    batch, heads, seq, feat = q.shape
    dv = v.shape[-1]
    den = (q * k.cumsum(2)).sum(-1, keepdim=True) + eps if normalize else None
    num_chunks = -(-seq // chunk)
    pad = num_chunks * chunk - seq
    if pad:
        q, k, v = (F.pad(x, (0, 0, 0, pad)) for x in (q, k, v))
    q, k = (x.reshape(batch, heads, num_chunks, chunk, feat) for x in (q, k))
    v = v.reshape(batch, heads, num_chunks, chunk, dv)
    out = (q @ k.transpose(-1, -2)).tril() @ v  # inside each chunk
    kv = k.transpose(-1, -2) @ v  # (B, H, nC, F, dv): each chunk's sum of φ(k_s) v_sᵀ
    before = F.pad(kv.cumsum(2)[:, :, :-1], (0, 0, 0, 0, 1, 0))  # sum over earlier chunks
    out = (out + q @ before).reshape(batch, heads, num_chunks * chunk, dv)[:, :, :seq]
    return out / den if normalize else out


@register("linear_attention")
class LinearAttentionBlock(Block):
    """x + LinearAttention(LayerNorm(x)).

    Parameters: norm d + q, k: 2·d·K + v: d·V + out: V·d, plus 4·(h_k² + h_k) for the two
    ``elementwise_product`` maps (2·(h_k² + h_k) when tied), with K = expand_k·d, V = expand_v·d,
    h_k = K / num_heads.
    """

    def __init__(
        self,
        d_model: int,
        max_len: int,
        *,
        block_index: int = 0,
        num_blocks: int = 1,
        num_heads: int = 16,
        expand_k: float = 1.0,
        expand_v: float = 1.0,
        feature_map: str = "elu",
        tie_feature_map_qk: bool = False,
        normalize: bool = True,
        eps: float = 1e-12,
        chunk_size: int = 64,
    ):
        super().__init__(d_model, max_len, block_index=block_index, num_blocks=num_blocks)
        key_dim, value_dim = int(d_model * expand_k), int(d_model * expand_v)
        if num_heads <= 0 or key_dim <= 0 or value_dim <= 0 or key_dim % num_heads \
                or value_dim % num_heads:
            raise BlockError(
                f"linear_attention: key dim {key_dim} and value dim {value_dim} must be positive "
                f"multiples of num_heads {num_heads}"
            )
        if feature_map not in FEATURE_MAPS:
            raise BlockError(
                f"linear_attention: unknown feature_map {feature_map!r}; valid: "
                f"{', '.join(FEATURE_MAPS)}"
            )
        if eps < 0:
            raise BlockError(f"linear_attention: eps must be >= 0, got {eps}")
        if not isinstance(chunk_size, int) or chunk_size <= 0:
            raise BlockError(
                f"linear_attention: chunk_size must be a positive integer, got {chunk_size!r}"
            )
        self.num_heads, self.key_dim, self.value_dim = num_heads, key_dim, value_dim
        self.head_k_dim, self.head_v_dim = key_dim // num_heads, value_dim // num_heads
        self.feature_map, self.normalize, self.eps = feature_map, normalize, eps
        self.chunk_size = chunk_size
        self.feature_dim = feature_dim(feature_map, self.head_k_dim)

        self.q_proj = nn.Linear(d_model, key_dim, bias=False)
        self.k_proj = nn.Linear(d_model, key_dim, bias=False)
        self.v_proj = nn.Linear(d_model, value_dim, bias=False)
        self.out_proj = nn.Linear(value_dim, d_model, bias=False)
        for lin in (self.q_proj, self.k_proj, self.v_proj):
            small_init_(lin.weight, d_model)
        wang_init_(self.out_proj.weight, d_model, num_blocks)
        if feature_map == "elementwise_product":  # learned maps keep nn.Linear's init (mad-lab)
            self.feature_map_q = HadamardFeatureMap(self.head_k_dim)
            self.feature_map_k = (
                self.feature_map_q if tie_feature_map_qk else HadamardFeatureMap(self.head_k_dim)
            )

    def _features(self, x: torch.Tensor, which: str) -> torch.Tensor:
        if self.feature_map == "elementwise_product":
            return getattr(self, f"feature_map_{which}")(x)
        if self.feature_map == "elu":
            return F.elu(x) + 1
        if self.feature_map == "relu":
            return F.relu(x)
        if self.feature_map == "taylor":
            return taylor_features(x)
        return x

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        B, S, _ = x.shape
        return x.view(B, S, self.num_heads, -1).transpose(1, 2)

    def mix(self, x: torch.Tensor) -> torch.Tensor:
        B, S, _ = x.shape
        q = self._features(self._heads(self.q_proj(x)), "q")
        k = self._features(self._heads(self.k_proj(x)), "k")
        v = self._heads(self.v_proj(x))
        o = linear_attention_chunked(q, k, v, self.eps, self.normalize, self.chunk_size)
        return self.out_proj(o.transpose(1, 2).reshape(B, S, self.value_dim))

    def state_size(self, seq_len: int) -> int:
        """Per head a feature_dim × head_v_dim state Σ φ(k)vᵀ, plus the normaliser Σ φ(k)."""
        per_head = self.feature_dim * self.head_v_dim + (self.feature_dim if self.normalize else 0)
        return self.num_heads * per_head
