"""Small operations several blocks share, written for speed on the CPU.

:func:`decayed_scores` is the intra-chunk score matrix of the gated linear recurrences (GLA,
RWKV-6): per-channel decays make it an L x L x d tensor, unless the decays are mild enough to
factor into the query and the key, when it is one matrix product (3-4x faster at the default
study's sizes).

:func:`causal_depthwise_conv` is the short causal convolution of the mLSTM, sLSTM, Mamba and
gated short-conv blocks. Timed here (float32, forward + backward, one thread), the depthwise
channels-last 2-D convolution it runs beat nn.Conv1d, a sum of K shifted multiply-adds and a
hand-written autograd function (shifted multiply-adds both ways) at every size tried:

    (batch, seq, channels)   channels-last   Conv1d    shifted   hand-written
    (64, 47, 32)             0.76 ms         1.11      1.22      1.48
    (64, 47, 64)             1.47            2.43      2.57      2.74
    (16, 128, 128)           2.03            2.31      3.33      4.15
    (16, 256, 256)           8.06            9.86      16.6      29.0

(oneDNN has a dedicated depthwise kernel for channels-last input, backward included; the
general Conv1d path does not reach it.) ``tests/test_blocks.py`` checks it against the direct sum.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from blocks import native

__all__ = ["DECAY_FACTOR_LIMIT", "causal_depthwise_conv", "decayed_scores", "glu",
           "tiled_causal_conv"]

# decayed_scores factors exp(b_t - b_s) = exp(b_t) exp(-b_s) while every |b| is at most this:
# both factors then stay within e^(+-40), far inside float32's range, and rounding each costs
# one ulp, as the direct exponential does.
DECAY_FACTOR_LIMIT = 40.0


def _native_conv_library():
    I64, PTR = native.I64, native.PTR
    return native.library("causal_conv", {"mad_causal_conv_fwd": [I64] * 6 + [PTR] * 5,
                                          "mad_causal_conv_bwd": [I64] * 6 + [PTR] * 9,
                                          "mad_causal_conv_t_fwd": [I64] * 6 + [PTR] * 4,
                                          "mad_causal_conv_t_bwd": [I64] * 6 + [PTR] * 7})


CONV_ACTIVATIONS = (None, "silu")


def _taps_major(weight: torch.Tensor) -> torch.Tensor:
    """nn.Conv1d's depthwise ``(C, 1, K)`` weight as the C kernels' ``(K, C)``."""
    return weight.reshape(weight.shape[0], weight.shape[-1]).t().contiguous()


def _param_grads(dw: torch.Tensor, db: torch.Tensor | None):
    """The weight and bias gradients from the C kernels' per-thread sums ``dw: (slots, K, C)``
    and ``db: (slots, C)`` (or None): summed over the slots, the weight's as ``(C, 1, K)``."""
    slots, K, C = dw.shape
    d_weight = (dw[0] if slots == 1 else dw.sum(0)).t().reshape(C, 1, K)
    d_bias = None if db is None else (db[0] if slots == 1 else db.sum(0))
    return d_weight, d_bias


class _NativeCausalConv(torch.autograd.Function):
    """:func:`causal_depthwise_conv` by the C kernel ``blocks/csrc/causal_conv.c`` (``act``: 0
    none, 1 SiLU, fused; the forward then keeps sigmoid of the convolution for the backward)."""

    @staticmethod
    def forward(ctx, x, weight, bias, act):
        lib = _native_conv_library()
        B, S, C = x.shape
        K = weight.shape[-1]
        x = x.contiguous()
        w, b = _taps_major(weight), None if bias is None else bias.contiguous()
        y = torch.empty_like(x)
        sig = torch.empty_like(x) if act and any(ctx.needs_input_grad[:3]) else None
        p = native.pointer
        native.parallel(B, lambda slot, b0, b1: lib.mad_causal_conv_fwd(
            b0, b1, S, C, K, act, p(x), p(w), None if b is None else p(b), p(y),
            None if sig is None else p(sig)))
        ctx.save_for_backward(x, w, b, sig)
        ctx.act = act
        return y

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dy):
        lib = _native_conv_library()
        x, w, b, sig = ctx.saved_tensors
        B, S, C = x.shape
        K = w.shape[0]
        dy = dy.contiguous()
        dx = torch.empty_like(x)
        slots = native.slots(B)
        dw = x.new_zeros(slots, K, C)
        db = None if b is None else x.new_zeros(slots, C)
        ws = x.new_empty(slots, (S + K) * 8)
        p = native.pointer
        native.parallel(B, lambda slot, b0, b1: lib.mad_causal_conv_bwd(
            b0, b1, S, C, K, ctx.act, p(x), None if sig is None else p(sig), p(w),
            None if b is None else p(b), p(dy), p(dx), p(dw[slot]),
            None if db is None else p(db[slot]), p(ws[slot])))
        return dx, *_param_grads(dw, db), None


def _native_glu_library():
    I64, PTR = native.I64, native.PTR
    return native.library("glu", {"mad_glu_fwd": [I64] * 4 + [PTR] * 2,
                                  "mad_glu_bwd": [I64] * 4 + [PTR] * 3})


GLU_ACTIVATIONS = ("silu", "gelu")


class _NativeGLU(torch.autograd.Function):
    """:func:`glu` by the C kernel ``blocks/csrc/glu.c``."""

    @staticmethod
    def forward(ctx, gate_up, act):
        lib = _native_glu_library()
        gate_up = gate_up.contiguous()
        *lead, H2 = gate_up.shape
        H, N = H2 // 2, gate_up.numel() // H2
        y = gate_up.new_empty(*lead, H)
        p = native.pointer
        native.parallel(N, lambda slot, n0, n1: lib.mad_glu_fwd(n0, n1, H, act, p(gate_up),
                                                                 p(y)))
        ctx.save_for_backward(gate_up)
        ctx.act = act
        return y

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dy):
        lib = _native_glu_library()
        (gate_up,) = ctx.saved_tensors
        dy = dy.contiguous()
        H2 = gate_up.shape[-1]
        H, N = H2 // 2, gate_up.numel() // H2
        d = torch.empty_like(gate_up)
        p = native.pointer
        native.parallel(N, lambda slot, n0, n1: lib.mad_glu_bwd(n0, n1, H, ctx.act, p(gate_up),
                                                                 p(dy), p(d)))
        return d, None


def glu(gate_up: torch.Tensor, activation: str = "silu", impl: str = "auto") -> torch.Tensor:
    """Gated linear unit: ``act(gate) * up`` from ``gate_up = [gate | up]``, (..., 2H) -> (..., H).

    ``activation``: "silu" (SwiGLU) or "gelu" (exact, erf-based, as ``F.gelu``). ``impl``:
    ``"native"`` the C kernel ``blocks/csrc/glu.c`` (float32 on the CPU, H a multiple of 8),
    ``"torch"`` torch's operators, ``"auto"`` the C kernel where it is loaded and applies.
    """
    if activation not in GLU_ACTIVATIONS:
        raise ValueError(f"activation must be one of {', '.join(GLU_ACTIVATIONS)}, "
                         f"got {activation!r}")
    unsupported = (None if gate_up.shape[-1] % 16 == 0
                   else f"the native GLU kernel takes halves that are multiples of 8, "
                        f"got {gate_up.shape[-1]} channels")
    if native.choose(impl, "glu", (gate_up,), _native_glu_library, unsupported):
        return _NativeGLU.apply(gate_up, GLU_ACTIVATIONS.index(activation))
    gate, up = gate_up.chunk(2, dim=-1)
    return (F.silu(gate) if activation == "silu" else F.gelu(gate)) * up


def causal_depthwise_conv(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    impl: str = "auto",
    activation: str | None = None,
) -> torch.Tensor:
    """Causal depthwise convolution along the sequence, ``(B, S, C) -> (B, S, C)``.

    ``weight`` is ``nn.Conv1d``'s ``(C, 1, K)``: ``y_t = bias + sum_k weight[:, 0, k] x_{t-K+1+k}``
    (zeros before the start), so ``weight[..., K - 1]`` multiplies the current position.
    ``activation``: None, or "silu" for ``SiLU(y)`` (fused into the C kernel: one pass each way).
    ``impl``: ``"native"`` the C kernel (float32 on the CPU), ``"torch"`` oneDNN's channels-last
    depthwise convolution, ``"auto"`` the C kernel where it is loaded and applies.
    """
    if activation not in CONV_ACTIVATIONS:
        raise ValueError(f"activation must be None or 'silu', got {activation!r}")
    if native.choose(impl, "causal_conv", (x, weight, bias), _native_conv_library):
        return _NativeCausalConv.apply(x, weight, bias, CONV_ACTIVATIONS.index(activation))
    K = weight.shape[-1]
    # (B, S, C) seen as a channels-last (B, C, 1, S) image: no copy either way
    image = F.pad(x, (0, 0, K - 1, 0)).transpose(1, 2).unsqueeze(2)
    y = F.conv2d(image, weight.unsqueeze(2), bias, groups=weight.shape[0])
    y = y.squeeze(2).transpose(1, 2)
    return F.silu(y) if activation == "silu" else y


def tiled_causal_conv(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, impl: str = "auto"
) -> torch.Tensor:
    """:func:`causal_depthwise_conv` of ``x`` repeated ``G`` times along the channels, returned
    channel-major: ``(B, S, Cin) -> (B, G Cin, S)`` with ``G = weight.shape[0] // Cin``.

    Hyena's short filter: its in-projection's output tiled ``proj_groups`` times (mad-lab's tied
    projection groups), and the long convolution after it reads and writes along the sequence.
    The C kernel (``impl`` as in :func:`causal_depthwise_conv`; Cin a multiple of 8, kernels of
    at most 16 taps) neither copies the tiles nor transposes in memory: it writes (B, C, S)
    directly and takes the gradient in that layout. The torch path repeats, convolves and
    returns a transposed view.
    """
    Cin, C = x.shape[-1], weight.shape[0]
    if C % Cin:
        raise ValueError(f"{C} output channels are not a whole number of tiles of {Cin}")
    unsupported = None
    if Cin % 8 or weight.shape[-1] > 16:
        unsupported = "the tiled kernel needs Cin a multiple of 8 and at most 16 taps"
    if native.choose(impl, "causal_conv", (x, weight, bias), _native_conv_library, unsupported):
        return _NativeTiledCausalConv.apply(x, weight, bias)
    tiled = x.repeat(1, 1, C // Cin) if C != Cin else x
    return causal_depthwise_conv(tiled, weight, bias, impl="torch").transpose(1, 2)


class _NativeTiledCausalConv(torch.autograd.Function):
    """:func:`tiled_causal_conv` by the C kernels ``mad_causal_conv_t_*`` (causal_conv.c)."""

    @staticmethod
    def forward(ctx, x, weight, bias):
        lib = _native_conv_library()
        B, S, Cin = x.shape
        C, K = weight.shape[0], weight.shape[-1]
        x = x.contiguous()
        w, b = _taps_major(weight), None if bias is None else bias.contiguous()
        y = x.new_empty(B, C, S)
        p = native.pointer
        native.parallel(B, lambda slot, b0, b1: lib.mad_causal_conv_t_fwd(
            b0, b1, S, Cin, C // Cin, K, p(x), p(w), None if b is None else p(b), p(y)))
        ctx.save_for_backward(x, w)
        ctx.has_bias = b is not None
        return y

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dy):
        lib = _native_conv_library()
        x, w = ctx.saved_tensors
        B, S, Cin = x.shape
        K, C = w.shape
        dy = dy.contiguous()
        dx = torch.empty_like(x)
        slots = native.slots(B)
        dw = x.new_zeros(slots, K, C)
        db = x.new_zeros(slots, C) if ctx.has_bias else None
        ws = x.new_empty(slots, (S + K) * 8)
        p = native.pointer
        native.parallel(B, lambda slot, b0, b1: lib.mad_causal_conv_t_bwd(
            b0, b1, S, Cin, C // Cin, K, p(x), p(w), p(dy), p(dx), p(dw[slot]),
            None if db is None else p(db[slot]), p(ws[slot])))
        return (dx, *_param_grads(dw, db))


def decayed_scores(
    q: torch.Tensor,
    k: torch.Tensor,
    b_q: torch.Tensor,
    b_k: torch.Tensor,
    *,
    strict: bool = False,
    factored: bool | None = None,
) -> torch.Tensor:
    """``A_ts = sum_d q_td k_sd exp(b_q_td - b_k_sd)`` for ``s <= t`` (``s < t`` when
    ``strict``), 0 above: ``q, b_q: (..., L, d)``, ``k, b_k: (..., L, d)`` -> ``(..., L, L)``.

    ``b`` are cumulative log decays from a chunk's start. Factored form (``factored`` None: when
    every ``|b|`` is at most DECAY_FACTOR_LIMIT; True forces it, False forbids it): the causal
    part of ``(q exp(b_q)) (k exp(-b_k))^T``. Otherwise the exact per-channel exponentials of the
    differences, which strong decays cannot overflow: an L x L x d tensor.
    """
    if factored is None:
        factored = bool(
            max(b_q.detach().abs().amax(), b_k.detach().abs().amax()) <= DECAY_FACTOR_LIMIT
        )
    diagonal = -1 if strict else 0
    if factored:
        scores = torch.matmul(q * b_q.exp(), (k * (-b_k).exp()).transpose(-2, -1))
        return scores.tril_(diagonal)  # in place: the product's backward needs only its inputs
    size = q.shape[-2]
    keep = torch.ones(size, size, dtype=torch.bool, device=q.device).tril(diagonal)
    log_decay = (b_q.unsqueeze(-2) - b_k.unsqueeze(-3)).masked_fill(~keep[..., None], -torch.inf)
    return (q.unsqueeze(-2) * k.unsqueeze(-3) * log_decay.exp()).sum(-1)
