"""Causal multi-head self-attention (Vaswani et al. 2017) as a pre-norm residual block.

Options: rotary position encoding (Su et al. 2021) or none, grouped-query heads (Ainslie et al.
2023: fewer ``num_kv_heads``) and a sliding window (each position attends to itself and the
``window - 1`` positions before it). The attention itself is :func:`causal_attention`: a C kernel
(``blocks/csrc/attention.c``) for float32 on the CPU, else
``torch.nn.functional.scaled_dot_product_attention``.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import nn

from blocks import native
from blocks.base import Block
from blocks.init import small_init_, wang_init_
from blocks.registry import BlockError, register


@functools.lru_cache(maxsize=32)
def rotary_tables(seq_len: int, head_dim: int, base: float, device=None, dtype=torch.float32):
    """cos/sin tables of shape (seq_len, head_dim // 2) for rotary position encoding (cached:
    the same few sizes come back every step; treat them as read-only). Built outside any
    inference mode, so tables first made during evaluation still serve training."""
    with torch.inference_mode(False), torch.no_grad():
        steps = torch.arange(0, head_dim, 2, device=device, dtype=torch.float64)
        inv_freq = 1.0 / (base ** (steps / head_dim))
        angles = torch.arange(seq_len, device=device, dtype=torch.float64)[:, None] * inv_freq
        return angles.cos().to(dtype), angles.sin().to(dtype)


class _NativeRotary(torch.autograd.Function):
    """Rotary encoding of token-major ``x (B, S, heads, D)`` by ``blocks/csrc/attention.c``'s
    ``mad_rope``; the backward is the rotation by the opposite angles."""

    @staticmethod
    def forward(ctx, x, cos, sin):
        ctx.save_for_backward(cos, sin)
        return _rotate(x, cos, sin, backward=False)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dy):
        cos, sin = ctx.saved_tensors
        return _rotate(dy, cos, sin, backward=True), None, None


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, backward: bool) -> torch.Tensor:
    lib = _native_attention_library()
    x, ld = _token_major(x)
    B, S, NHD, D = x.shape
    y = x.new_empty(B, S, NHD, D)
    cos, sin, p = cos.contiguous(), sin.contiguous(), native.pointer
    native.parallel(B * S, lambda slot, n0, n1: lib.mad_rope(
        n0, n1, S, NHD, D, int(backward), p(cos), p(sin), p(x), ld, p(y)))
    return y


def rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, impl: str = "auto"):
    """:func:`apply_rotary` of token-major ``x (B, S, heads, D)`` with tables ``(S, D/2)``: the C
    kernel (float32 on the CPU) or torch's operators (``impl`` as :func:`causal_attention`)."""
    if native.choose(impl, "attention", (x, cos, sin), _native_attention_library):
        return _NativeRotary.apply(x, cos, sin)
    return apply_rotary(x, cos.unsqueeze(1), sin.unsqueeze(1))


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate pairs (x[..., :d/2], x[..., d/2:]) of x by position-dependent angles: cos and sin
    broadcast against x[..., :d/2], e.g. x (B, H, S, D) with tables (S, D/2), or x (B, S, H, D)
    with tables (S, 1, D/2)."""
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half], x[..., half:]
    return torch.cat((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1)


NATIVE_MAX_HEAD = 64  # blocks/csrc/attention.c's DMAX: larger heads (and head sizes that are not
# a multiple of its 8-float vectors) take torch's kernels


def _native_attention_library():
    I64, F32, PTR = native.I64, native.F32, native.PTR
    head = [I64] * 7 + [F32] + [PTR, I64] * 3
    return native.library("attention", {"mad_attention_fwd": head + [PTR] * 3,
                                        "mad_attention_bwd": head + [PTR] * 7,
                                        "mad_rope": [I64] * 6 + [PTR] * 3 + [I64, PTR]})


def _token_major(t: torch.Tensor) -> tuple[torch.Tensor, int]:
    """``t`` (B, S, heads, D) as the kernel reads it: each head's D floats contiguous, the heads
    of a token side by side, tokens ``ld`` floats apart, batch elements ``S * ld`` apart (a view
    of a wider (B, S, X) tensor qualifies); else a contiguous copy. Returns (tensor, ld)."""
    B, S, NH, D = t.shape
    ld = t.stride(1)
    if t.stride(3) == 1 and t.stride(2) == D and t.stride(0) == S * ld and ld >= NH * D:
        return t, ld
    t = t.contiguous()
    return t, NH * D


class _NativeAttention(torch.autograd.Function):
    """:func:`causal_attention` by the C kernel; saves the inputs, the output and the log-sum-exp
    of every row, and recomputes the scores in the backward."""

    @staticmethod
    def forward(ctx, q, k, v, window):
        lib = _native_attention_library()
        B, S, H, D = q.shape
        KVH = k.shape[2]
        (q, ldq), (k, ldk), (v, ldv) = _token_major(q), _token_major(k), _token_major(v)
        y = q.new_empty(B, S, H, D)
        lse = q.new_empty(B, H, S)
        P = B * KVH
        SP = -(-S // 8) * 8  # the kernel's key blocks: S rounded up to whole vectors
        ws = q.new_empty(native.slots(P), D * SP + 4 * SP)
        scale, p = D ** -0.5, native.pointer
        native.parallel(P, lambda slot, p0, p1: lib.mad_attention_fwd(
            p0, p1, S, H, KVH, D, window, scale, p(q), ldq, p(k), ldk, p(v), ldv, p(y), p(lse),
            p(ws[slot])))
        ctx.save_for_backward(q, k, v, y, lse)
        ctx.lds, ctx.window = (ldq, ldk, ldv), window
        return y

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dy):
        lib = _native_attention_library()
        q, k, v, y, lse = ctx.saved_tensors
        (ldq, ldk, ldv), window = ctx.lds, ctx.window
        B, S, H, D = y.shape
        KVH = k.shape[2]
        dy = dy.contiguous()
        dq = q.new_empty(B, S, H, D)
        dk, dv = k.new_empty(B, S, KVH, D), v.new_empty(B, S, KVH, D)
        P = B * KVH
        SP = -(-S // 8) * 8
        ws = q.new_empty(native.slots(P), 2 * D * SP + 2 * D * S + 8 * SP)
        scale, p = D ** -0.5, native.pointer
        native.parallel(P, lambda slot, p0, p1: lib.mad_attention_bwd(
            p0, p1, S, H, KVH, D, window, scale, p(q), ldq, p(k), ldk, p(v), ldv, p(y), p(lse),
            p(dy), p(dq), p(dk), p(dv), p(ws[slot])))
        return dq, dk, dv, None


def causal_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    window: int | None = None,
    impl: str = "auto",
) -> torch.Tensor:
    """Causal softmax attention, scale ``1/sqrt(D)``, token-major layouts.

    q (B, S, H, D); k, v (B, S, KVH, D) with H a multiple of KVH (query head h reads key/value
    head ``h // (H // KVH)``); returns (B, S, H, D). ``window``: position t sees t - window + 1
    ... t (None: every earlier position). ``impl``: ``"native"`` the C kernel
    ``blocks/csrc/attention.c`` (float32 on the CPU, head sizes 8, 16, ... 64), ``"torch"``
    PyTorch's scaled_dot_product_attention, ``"auto"`` the C kernel where it is loaded and
    applies.
    """
    S, H, KVH = q.shape[1], q.shape[2], k.shape[2]
    window = None if window is None or window >= S else int(window)
    D = q.shape[-1]
    unsupported = (None if D % 8 == 0 and D <= NATIVE_MAX_HEAD  # whole 8-float vectors
                   else f"the native attention kernel takes head sizes that are multiples of 8 "
                        f"up to {NATIVE_MAX_HEAD}, got {D}")
    if native.choose(impl, "attention", (q, k, v), _native_attention_library, unsupported):
        return _NativeAttention.apply(q, k, v, window or 0)
    q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
    gqa = KVH != H
    if window is None:
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa)
    else:
        i = torch.arange(S, device=q.device)
        dist = i[:, None] - i[None, :]
        mask = (dist >= 0) & (dist < window)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=gqa)
    return y.transpose(1, 2)


@register("attention")
class AttentionBlock(Block):
    """x + Attention(LayerNorm(x)), causal, optional RoPE / GQA / sliding window."""

    def __init__(
        self,
        d_model: int,
        max_len: int,
        *,
        block_index: int = 0,
        num_blocks: int = 1,
        num_heads: int = 4,
        num_kv_heads: int | None = None,
        window: int | None = None,
        position: str = "rope",
        rope_base: float = 10000.0,
    ):
        super().__init__(d_model, max_len, block_index=block_index, num_blocks=num_blocks)
        num_kv_heads = num_heads if num_kv_heads is None else num_kv_heads
        if num_heads <= 0 or d_model % num_heads:
            raise BlockError(
                f"attention: d_model {d_model} must be divisible by num_heads {num_heads}"
            )
        if num_kv_heads <= 0 or num_heads % num_kv_heads:
            raise BlockError(
                f"attention: num_heads {num_heads} must be a multiple of "
                f"num_kv_heads {num_kv_heads}"
            )
        if window is not None and window <= 0:
            raise BlockError(f"attention: window must be a positive integer or null, got {window}")
        if position not in ("rope", "none"):
            raise BlockError(f"attention: position must be 'rope' or 'none', got {position!r}")
        self.num_heads, self.num_kv_heads = num_heads, num_kv_heads
        self.head_dim = d_model // num_heads
        if position == "rope" and self.head_dim % 2:
            raise BlockError(f"attention: rope needs an even head dim, got {self.head_dim}")
        self.window, self.position, self.rope_base = window, position, rope_base
        kv_dim = num_kv_heads * self.head_dim
        self.qkv = nn.Linear(d_model, d_model + 2 * kv_dim, bias=False)
        self.out = nn.Linear(d_model, d_model, bias=False)
        small_init_(self.qkv.weight, d_model)
        wang_init_(self.out.weight, d_model, num_blocks)

    def mix(self, x: torch.Tensor) -> torch.Tensor:
        B, S, _ = x.shape
        H, KVH, D = self.num_heads, self.num_kv_heads, self.head_dim
        qk, v = self.qkv(x).split([self.d_model + KVH * D, KVH * D], dim=-1)
        qk = qk.view(B, S, H + KVH, D)
        if self.position == "rope":  # queries and keys rotated together: half the operations
            cos, sin = rotary_tables(S, D, self.rope_base, x.device, x.dtype)
            qk = rotary(qk, cos, sin)
        q, k = qk.split([H, KVH], dim=2)
        y = causal_attention(q, k, v.view(B, S, KVH, D), self.window)
        return self.out(y.reshape(B, S, self.d_model))

    def state_size(self, seq_len: int) -> int:
        """KV cache: keys and values of every position the last query can see."""
        seen = seq_len if self.window is None else min(seq_len, self.window)
        return 2 * self.num_kv_heads * self.head_dim * seen
