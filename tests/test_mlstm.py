"""The mLSTM cell's three forms and the mLSTM block (blocks/mlstm.py).

Inputs are fresh random draws each run (torch's default generator, never seeded here).
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch_threads import torch_threads

from blocks import native
from blocks.mlstm import (
    AUTO_PARALLEL_MAX_CHUNKS,
    HeadwiseLinear,
    MLSTMBlock,
    _Decay,
    _decay,
    _factored_choice,
    mlstm_chunkwise,
    mlstm_gates,
    mlstm_native,
    mlstm_output,
    mlstm_parallel,
    mlstm_recurrent,
)
from blocks.registry import BlockError

needs_native = pytest.mark.skipif(native.compiler() is None, reason="no C compiler")


@pytest.fixture(autouse=True)
def _few_threads():
    """Overrides conftest's: these tensors are tiny, and one thread runs them fastest."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# --------------------------------------------------------------------------------------------
# cell: inputs and independent references

# gate regimes: (input-gate mean, input-gate spread, forget-gate mean, forget-gate spread)
REGIMES = {
    "moderate": (0.0, 1.0, 3.0, 1.0),
    "input_near_+10": (10.0, 3.0, 3.0, 2.0),
    "input_near_-10": (-10.0, 3.0, 3.0, 2.0),
    "input_very_negative": (-30.0, 3.0, 0.0, 3.0),
    "forget_closed": (0.0, 3.0, -5.0, 2.0),
    "forget_open": (2.0, 2.0, 8.0, 1.0),
}


def cell_inputs(regime, S, *, B=2, NH=2, DQK=8, DV=6, dtype=torch.float64, positive_qk=False):
    i_mean, i_std, f_mean, f_std = REGIMES[regime]
    q, k = torch.randn(B, NH, S, DQK), torch.randn(B, NH, S, DQK)
    if positive_qk:  # q . k > 0 everywhere: no cancellation in the normaliser
        q, k = q.abs(), k.abs()
    v = torch.randn(B, NH, S, DV)
    i_pre = i_mean + i_std * torch.randn(B, NH, S)
    f_pre = f_mean + f_std * torch.randn(B, NH, S)
    return tuple(t.to(dtype) for t in (q, k, v, i_pre, f_pre))


def chunked(chunk_size):
    def run(*args, **kwargs):
        return mlstm_chunkwise(*args, chunk_size=chunk_size, **kwargs)

    return run


def matrix_only(form):
    """The form with the decay always an explicit S x S matrix (never the factored product)."""

    def run(*args, **kwargs):
        return form(*args, factored=False, **kwargs)

    return run


# The default forms take the factored decay wherever its spread allows (most regimes at these
# sizes; test_decay_takes_the_factored_form_where_it_is_safe checks which); the "_matrix" ones
# never do, so both paths meet every test below.
FORMS = {
    "recurrent": mlstm_recurrent,
    "parallel": mlstm_parallel,
    "parallel_matrix": matrix_only(mlstm_parallel),
    "chunkwise16": chunked(16),
    "chunkwise64": chunked(64),
    "chunkwise7": chunked(7),
    "chunkwise16_matrix": matrix_only(chunked(16)),
}


def conditioning(q, k, v, i_pre, f_pre):
    """How much rounding each output h_t can amplify (B, NH, S), from a direct float64 sum.

    kappa_t = sum_j w_tj (|q_t| . |k_j|) / sqrt(d) / normaliser_t with w the stabilised decay
    weights: large where the normaliser nearly cancels. Rounding errors of size u in the terms
    move h_t by about u * kappa_t * (|h_t| + max |v|).
    """
    q, k, v, i_pre, f_pre = (t.double() for t in (q, k, v, i_pre, f_pre))
    S, d = q.shape[-2], q.shape[-1]
    log_f = F.logsigmoid(f_pre)
    cum = torch.cumsum(log_f, -1)
    log_d = cum[..., :, None] - cum[..., None, :] + i_pre[..., None, :]
    log_d = log_d.masked_fill(~torch.ones(S, S, dtype=torch.bool).tril(), -math.inf)
    m = torch.maximum(log_d.amax(-1), cum)
    w = torch.exp(log_d - m[..., None])
    qk = q @ k.transpose(-1, -2) / math.sqrt(d)
    qk_abs = q.abs() @ k.abs().transpose(-1, -2) / math.sqrt(d)
    norm = torch.maximum((w * qk).sum(-1).abs(), torch.exp(-m))
    return (w * qk_abs).sum(-1) / norm


def unstabilised_reference(q, k, v, i_pre, f_pre):
    """The paper's mLSTM without the stabiliser m, step by step in float64, eps = 0.

    C_t = sigmoid(f~_t) C_{t-1} + exp(i~_t) k_t v_t^T / sqrt(d); n_t likewise with k_t;
    h_t = C_t^T q_t / max(|q_t . n_t|, 1). Only valid where exp(i~) and products of forget
    gates stay in range, i.e. for moderate gate values.
    """
    q, k, v, i_pre, f_pre = (t.double() for t in (q, k, v, i_pre, f_pre))
    B, NH, S, d = q.shape
    out = torch.zeros(B, NH, S, v.shape[-1], dtype=torch.float64)
    for b in range(B):
        for h in range(NH):
            C = torch.zeros(d, v.shape[-1], dtype=torch.float64)
            n = torch.zeros(d, dtype=torch.float64)
            for t in range(S):
                f_gate = 1.0 / (1.0 + math.exp(-f_pre[b, h, t].item()))
                i_gate = math.exp(i_pre[b, h, t].item())
                k_t = k[b, h, t] / math.sqrt(d)
                C = f_gate * C + i_gate * torch.outer(k_t, v[b, h, t])
                n = f_gate * n + i_gate * k_t
                q_t = q[b, h, t]
                out[b, h, t] = q_t @ C / max(abs(float(q_t @ n)), 1.0)
    return out


# --------------------------------------------------------------------------------------------
# cell: the three forms agree


@pytest.mark.parametrize("regime", sorted(REGIMES))
@pytest.mark.parametrize("S", [1, 37, 130])
def test_cell_forms_agree_in_float64(regime, S):
    args = cell_inputs(regime, S)
    ref = mlstm_recurrent(*args)
    scale = conditioning(*args)[..., None] * (ref.abs() + args[2].abs().amax())
    for name, form in FORMS.items():
        h = form(*args)
        assert h.dtype == torch.float64 and h.shape == ref.shape
        err = ((h - ref).abs() / scale).max().item()
        assert err < 1e-11, f"{name}: scaled error {err:.2e}"


@pytest.mark.parametrize("regime", sorted(REGIMES))
@pytest.mark.parametrize("S", [1, 37, 130])
def test_cell_forms_agree_in_float32_to_rounding(regime, S):
    """Each float32 form is within float32 rounding of the float64 result.

    The error is measured against the problem's own conditioning (a normaliser that nearly
    cancels amplifies any rounding), so the bound is tight for every regime.
    """
    args = cell_inputs(regime, S, dtype=torch.float32)
    ref = mlstm_parallel(*(t.double() for t in args))  # equals the recurrence (test above)
    scale = conditioning(*args)[..., None] * (ref.abs() + args[2].double().abs().amax())
    for name, form in FORMS.items():
        h = form(*args)
        assert h.dtype == torch.float32 and torch.isfinite(h).all()
        err = ((h.double() - ref).abs() / scale).max().item()
        assert err < 2e-5, f"{name}: scaled error {err:.2e}"


@pytest.mark.parametrize("regime", sorted(REGIMES))
def test_cell_forms_allclose_in_float32_when_well_conditioned(regime):
    args = cell_inputs(regime, 130, dtype=torch.float32, positive_qk=True)
    ref = mlstm_recurrent(*args)
    for name, form in FORMS.items():
        torch.testing.assert_close(form(*args), ref, rtol=1e-4, atol=1e-4, msg=name)


@pytest.mark.parametrize("regime", ["moderate", "forget_closed", "forget_open"])
def test_stabiliser_does_not_change_the_maths(regime):
    """All forms equal the paper's un-stabilised recurrence (float64, eps = 0)."""
    args = cell_inputs(regime, 37, DQK=4, DV=3)
    ref = unstabilised_reference(*args)
    for name, form in FORMS.items():
        torch.testing.assert_close(form(*args, eps=0.0), ref, rtol=1e-9, atol=1e-12, msg=name)


def test_eps_enters_as_documented():
    """With the default eps the outputs differ from eps = 0 by the eps term alone."""
    args = cell_inputs("moderate", 37)
    for name, form in FORMS.items():
        h0, h1 = form(*args, eps=0.0), form(*args)
        rel = ((h1 - h0).abs() / h0.abs().clamp_min(1e-3)).max().item()
        assert 0 < rel < 1e-3, name


@pytest.mark.parametrize("i_shift", [-200.0, -1000.0, 60.0])
def test_cell_extreme_input_gates_stay_finite(i_shift):
    """No exponential overflows: outputs and gradients are finite and the forms agree."""
    q, k, v, i_pre, f_pre = cell_inputs("moderate", 40, dtype=torch.float32, positive_qk=True)
    i_pre = i_pre + i_shift
    outs = {}
    for name, form in FORMS.items():
        leaves = [t.clone().requires_grad_() for t in (q, k, v, i_pre, f_pre)]
        h = form(*leaves)
        (h * torch.randn_like(h)).sum().backward()
        assert torch.isfinite(h).all(), name
        assert all(torch.isfinite(t.grad).all() for t in leaves), name
        outs[name] = h
    ref = mlstm_recurrent(*(t.double() for t in (q, k, v, i_pre, f_pre)))
    for name, h in outs.items():
        torch.testing.assert_close(h.double(), ref, rtol=1e-4, atol=1e-5, msg=name)


@pytest.mark.parametrize("regime", ["moderate", "input_near_+10", "forget_closed"])
def test_cell_gradients_agree_in_float64(regime):
    base = cell_inputs(regime, 37)
    weight = torch.randn(2, 2, 37, 6, dtype=torch.float64)
    grads = {}
    for name, form in FORMS.items():
        leaves = [t.clone().requires_grad_() for t in base]
        (form(*leaves) * weight).sum().backward()
        grads[name] = [t.grad for t in leaves]
    for name, gs in grads.items():
        for g, r in zip(gs, grads["recurrent"]):
            # the gate gradients can reach 1e8 where the normaliser nearly cancels
            atol = 1e-9 * r.abs().max().item()
            torch.testing.assert_close(g, r, rtol=1e-7, atol=atol, msg=name)


def test_cell_parallel_form_keeps_precision_on_long_sequences():
    """F_t - F_j is not taken from two large float32 cumulative sums.

    Leaky forget gates (log f ~ -1 per step) make |F| reach ~1000 over 1024 steps, where a
    float32 difference of cumulative sums is off by ~1e-4 in the exponent.
    """
    args = cell_inputs("moderate", 1024, B=1, DQK=16, DV=16, dtype=torch.float32, positive_qk=True)
    q, k, v, i_pre, _ = args
    f_pre = -0.5 + 0.5 * torch.randn_like(i_pre)
    ref = mlstm_parallel(*(t.double() for t in (q, k, v, i_pre, f_pre)))
    for form in (mlstm_parallel, mlstm_chunkwise):
        h = form(q, k, v, i_pre, f_pre)
        assert ((h.double() - ref).abs().max() / ref.abs().max()).item() < 1e-6


def test_cell_low_precision_inputs_compute_in_float32():
    """bfloat16 inputs: the result is the float32 computation rounded once at the end."""
    args = cell_inputs("moderate", 37, dtype=torch.bfloat16)
    for name, form in FORMS.items():
        h = form(*args)
        assert h.dtype == torch.bfloat16, name
        expected = form(*(t.float() for t in args)).to(torch.bfloat16)
        torch.testing.assert_close(h, expected, rtol=0, atol=0, msg=name)


def test_decay_takes_the_factored_form_where_it_is_safe():
    """Moderate gates: the factored decay g_t a_j, equal to the explicit matrix; closed forget
    gates over 130 steps spread the stabiliser by hundreds: the explicit matrix."""
    q, k, v, i_pre, f_pre = cell_inputs("moderate", 37)
    log_f = F.logsigmoid(f_pre)
    auto, matrix = _decay(log_f, i_pre), _decay(log_f, i_pre, factored=False)
    assert auto.matrix is None and matrix.matrix is not None
    product = (auto.g.unsqueeze(-1) * auto.a.unsqueeze(-2)).tril()
    torch.testing.assert_close(product, matrix.matrix, rtol=1e-12, atol=1e-300)
    torch.testing.assert_close(auto.m, matrix.m, rtol=0, atol=0)
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    out, qn = auto.read(*leaves)
    out_ref, qn_ref = matrix.read(q, k, v)
    torch.testing.assert_close(out, out_ref)
    torch.testing.assert_close(qn, qn_ref)
    # the hand-written backward of the factored read, against autograd's finite differences
    g, a = auto.g.detach(), auto.a.detach()
    torch.autograd.gradcheck(
        lambda q, k, v: _Decay(auto.m, auto.w_start, g=g, a=a).read(q, k, v), leaves
    )

    _, _, _, i_pre, f_pre = cell_inputs("forget_closed", 130)
    wide = _decay(F.logsigmoid(f_pre), i_pre)
    assert wide.matrix is not None and wide.g is None
    # a chunk shorter than the head size keeps the matrix (measured faster there)
    assert _factored_choice(None, 16, 32) is False and _factored_choice(None, 32, 32) is None


def test_chunkwise_handles_remainders_and_tiny_chunks():
    args = cell_inputs("moderate", 29)
    ref = mlstm_recurrent(*args)
    for chunk_size in (1, 2, 5, 28, 29, 30, 1000):
        torch.testing.assert_close(mlstm_chunkwise(*args, chunk_size=chunk_size), ref)


# --------------------------------------------------------------------------------------------
# block


def small_block(**kw) -> MLSTMBlock:
    kw.setdefault("chunk_size", 16)
    return MLSTMBlock(64, 64, **kw)  # inner 128, 4 heads of 32


def expected_num_params(E, inner, heads, kernel, qkv_block):
    return (
        E  # pre-norm weight (no bias)
        + E * 2 * inner  # proj_up
        + inner * (kernel + 1)  # depthwise conv + bias
        + 3 * (inner // qkv_block) * qkv_block * qkv_block  # q, k, v block-diagonal
        + 2 * (3 * inner * heads + heads)  # input and forget gates, with bias
        + inner  # group-norm weight
        + inner  # learnable skip
        + inner * E  # proj_down
    )


def test_block_is_registered_and_builds():
    import blocks

    assert "mlstm" in blocks.names()
    block = blocks.build("mlstm", d_model=48, max_len=32, num_heads=2)
    assert isinstance(block, MLSTMBlock)
    assert block.inner_dim == 128  # 2 * 48 = 96, rounded up to a multiple of 64


@pytest.mark.parametrize("cell", ["parallel", "chunkwise", "recurrent", "auto"])
def test_block_shape_dtype_and_finite_gradients(cell):
    block = small_block(cell=cell)
    x = torch.randn(3, 40, 64, requires_grad=True)
    y = block(x)
    assert y.shape == x.shape and y.dtype == torch.float32
    (y * torch.randn_like(y)).sum().backward()
    assert torch.isfinite(x.grad).all()
    for name, p in block.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
        assert p.grad.abs().sum() > 0, name


@pytest.mark.parametrize("cell", ["parallel", "chunkwise"])
def test_block_is_causal(cell):
    block = small_block(cell=cell)
    S, t = 40, 21
    x = torch.randn(2, S, 64)
    x2 = x.clone()
    x2[:, t + 1 :] = torch.randn(2, S - t - 1, 64)
    with torch.no_grad():
        y, y2 = block(x), block(x2)
    torch.testing.assert_close(y2[:, : t + 1], y[:, : t + 1], rtol=0, atol=1e-6)
    assert (y2[:, t + 1 :] - y[:, t + 1 :]).abs().max() > 1e-3  # the perturbation does reach


def test_block_cell_modes_give_the_same_output():
    block = small_block(cell="recurrent").double()
    x = torch.randn(2, 45, 64, dtype=torch.float64)
    with torch.no_grad():
        ref = block(x)
        for cell in ("parallel", "chunkwise", "auto"):
            block.cell = cell
            torch.testing.assert_close(block(x), ref, rtol=1e-10, atol=1e-12, msg=cell)
    block = small_block(cell="parallel")
    x = x.float()
    with torch.no_grad():
        ref = block(x)
        block.cell = "chunkwise"
        torch.testing.assert_close(block(x), ref, rtol=1e-5, atol=1e-5)


# --------------------------------------------------------------------------------------------
# cell: the native (C) recurrent form


KERNELS = ["lanes", "rows"]  # blocks/csrc/mlstm8.c (eight lanes per vector), mlstm.c (a lane)


@needs_native
@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("regime", sorted(REGIMES))
@pytest.mark.parametrize("S", [1, 37, 130])
def test_native_cell_agrees_in_float32_to_rounding(regime, S, kernel):
    # B x NH = 10 lanes: the eight-lane kernel's second group is mostly padding
    args = cell_inputs(regime, S, B=2, NH=5, dtype=torch.float32)
    ref = mlstm_parallel(*(t.double() for t in args))
    scale = conditioning(*args)[..., None] * (ref.abs() + args[2].double().abs().amax())
    h = mlstm_native(*args, kernel=kernel)
    assert h.dtype == torch.float32 and h.shape == ref.shape and torch.isfinite(h).all()
    err = ((h.double() - ref).abs() / scale).max().item()
    assert err < 2e-5, f"scaled error {err:.2e}"


@needs_native
@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("regime", sorted(REGIMES))
def test_native_cell_gradients_equal_autograd_through_the_recurrence(regime, kernel):
    # exact derivative of the stabilised steps, the stabiliser's own gradient included: against
    # autograd through mlstm_recurrent in float64, on well-conditioned inputs
    args64 = [t.requires_grad_() for t in cell_inputs(regime, 29, B=3, NH=3, DQK=8, DV=16,
                                                       positive_qk=True)]
    dh = torch.randn(3, 3, 29, 16, dtype=torch.float64)
    grads_ref = torch.autograd.grad(mlstm_recurrent(*args64), args64, dh)
    args32 = [t.detach().float().requires_grad_() for t in args64]
    grads = torch.autograd.grad(mlstm_native(*args32, kernel=kernel), args32, dh.float())
    for name, g, g_ref in zip(("q", "k", "v", "i", "f"), grads, grads_ref):
        err = ((g.double() - g_ref).abs().max() / g_ref.abs().max().clamp_min(1e-6)).item()
        assert err < 1e-4, f"grad of {name}: relative error {err:.2e}"


@needs_native
@pytest.mark.parametrize("kernel", KERNELS)
def test_native_cell_eps_and_large_input_gates(kernel):
    # eps enters as in the other forms; input gates far above zero keep the output finite
    args = cell_inputs("moderate", 37, dtype=torch.float32)
    h0, h1 = mlstm_native(*args, eps=0.0, kernel=kernel), mlstm_native(*args, kernel=kernel)
    ref0 = mlstm_recurrent(*(t.double() for t in args), eps=0.0)
    torch.testing.assert_close(h0.double(), ref0, rtol=1e-3, atol=1e-4)
    assert 0 < ((h1 - h0).abs() / h0.abs().clamp_min(1e-3)).max().item() < 1e-3
    q, k, v, i_pre, f_pre = args
    h = mlstm_native(q, k, v, i_pre + 60.0, f_pre, kernel=kernel)
    assert torch.isfinite(h).all()


@needs_native
@pytest.mark.parametrize("kernel", KERNELS)
def test_native_cell_splits_lanes_over_threads(kernel):
    # 20 lanes: three groups of eight for the eight-lane kernel, so 3 threads get one each
    args = [t.requires_grad_() for t in cell_inputs("moderate", 40, B=4, NH=5, dtype=torch.float32)]
    dh = torch.randn(4, 5, 40, 6)
    results = []
    try:
        for threads in (1, 3):
            torch.set_num_threads(threads)
            h = mlstm_native(*args, kernel=kernel)
            results.append((h, *torch.autograd.grad(h, args, dh)))
    finally:
        torch.set_num_threads(1)
    for one, three in zip(*results):
        torch.testing.assert_close(one, three)


@needs_native
@pytest.mark.parametrize("DQK,DV", [(8, 16), (12, 24), (6, 10)])  # vectors; vectors; plain loops
def test_row_kernel_reads_and_writes_the_block_layout_in_place(DQK, DV):
    # q, k, v as (B, NH, S, D) views of (B, S, NH, D) memory: the row kernel reads them where
    # they lie and writes h and the gradients in the same layout (no lane-major copies); dh in
    # another layout is accepted. Against autograd through the float64 recurrence.
    B, NH, S = 2, 3, int(torch.randint(20, 40, ()).item())

    def block_layout(D, positive=False):
        t = torch.randn(B, S, NH, D)
        return (t.abs() if positive else t).transpose(1, 2)

    q, k, v = block_layout(DQK, True), block_layout(DQK, True), block_layout(DV)
    i_pre, f_pre = torch.randn(B, NH, S), torch.randn(B, NH, S) + 3.0
    args = [t.requires_grad_() for t in (q, k, v, i_pre, f_pre)]
    dh = torch.randn(B, NH, S, DV)  # contiguous: not v's layout
    ref_args = [t.detach().double().requires_grad_() for t in args]
    ref = mlstm_recurrent(*ref_args)
    ref_grads = torch.autograd.grad(ref, ref_args, dh.double())
    h = mlstm_native(*args, kernel="rows")
    assert h.stride() == v.stride()  # written in the block's layout
    torch.testing.assert_close(h.double(), ref.detach(), rtol=1e-4, atol=1e-5)
    grads = torch.autograd.grad(h, args, dh)
    for name, g, g_ref, arg in zip("qkvif", grads, ref_grads, args):
        if name in "qkv":
            assert g.stride() == arg.stride(), name
        err = ((g.double() - g_ref).abs().max() / g_ref.abs().max().clamp_min(1e-6)).item()
        assert err < 1e-4, f"grad of {name}: relative error {err:.2e}"


@needs_native
def test_native_cell_reads_strided_inputs_and_short_segments(monkeypatch):
    # q, k, v as the block passes them (head views of one wide (B, S, X) tensor), the gates as
    # slices of one (B, 2 NH, S) tensor, dh transposed; checkpoint segments of 3 steps
    import blocks.mlstm as mlstm

    B, NH, S, DH = 3, 4, 23, 8
    # q, k > 0: no cancellation in the normaliser q . n, so float32 against float64 is a fair
    # comparison (as in the gradient test above)
    wide = torch.randn(B, S, 3 * NH * DH + 5)
    wide[..., :2 * NH * DH] = wide[..., :2 * NH * DH].abs()
    q, k, v = (wide[..., i * NH * DH:(i + 1) * NH * DH].view(B, S, NH, DH).transpose(1, 2)
               for i in range(3))
    gates = torch.randn(B, 2 * NH, S) + torch.tensor([0.0] * NH + [3.0] * NH)[:, None]
    args = [q, k, v, gates[:, :NH], gates[:, NH:]]
    dh = torch.randn(B, S, NH, DH).transpose(1, 2)
    ref_args = [t.detach().double().requires_grad_() for t in args]
    ref = mlstm_recurrent(*ref_args)
    ref_grads = torch.autograd.grad(ref, ref_args, dh.double())
    monkeypatch.setattr(mlstm, "_lanes_segment", lambda dqk, dv, seq: 3)
    wide, gates = wide.clone().requires_grad_(), gates.clone().requires_grad_()
    q, k, v = (wide[..., i * NH * DH:(i + 1) * NH * DH].view(B, S, NH, DH).transpose(1, 2)
               for i in range(3))
    args = [q, k, v, gates[:, :NH], gates[:, NH:]]
    h = mlstm_native(*args, kernel="lanes")
    assert h.shape == (B, NH, S, DH)
    torch.testing.assert_close(h.double(), ref.detach(), rtol=1e-4, atol=1e-5)
    grads = torch.autograd.grad(h, args, dh)
    for name, g, g_ref in zip(("q", "k", "v", "i", "f"), grads, ref_grads):
        err = ((g.double() - g_ref).abs().max() / g_ref.abs().max().clamp_min(1e-6)).item()
        assert err < 1e-4, f"grad of {name}: relative error {err:.2e}"


@needs_native
@pytest.mark.parametrize("DH", [8, 12, 16, 24])
def test_native_lanes_cell_at_square_heads_with_partial_groups(DH):
    # DQK = DV: the eight-lane kernel's compile-time head sizes (8, 16, 24) and a run-time one
    # (12: one transposed block of eight per row plus four single floats); 11 lanes, so the
    # second group is partial (scalar scatter)
    args64 = [t.requires_grad_() for t in cell_inputs("moderate", 21, B=1, NH=11, DQK=DH, DV=DH,
                                                       positive_qk=True)]
    dh = torch.randn(1, 11, 21, DH, dtype=torch.float64)
    ref = mlstm_recurrent(*args64)
    grads_ref = torch.autograd.grad(ref, args64, dh)
    args32 = [t.detach().float().requires_grad_() for t in args64]
    h = mlstm_native(*args32, kernel="lanes")
    torch.testing.assert_close(h.double(), ref.detach(), rtol=1e-4, atol=1e-5)
    grads = torch.autograd.grad(h, args32, dh.float())
    for name, g, g_ref in zip(("q", "k", "v", "i", "f"), grads, grads_ref):
        err = ((g.double() - g_ref).abs().max() / g_ref.abs().max().clamp_min(1e-6)).item()
        assert err < 1e-4, f"grad of {name}: relative error {err:.2e}"


@needs_native
def test_native_cell_refuses_what_it_cannot_run():
    args = cell_inputs("moderate", 5, dtype=torch.float32)
    with pytest.raises(ValueError, match="kernel must be"):
        mlstm_native(*args, kernel="simd")
    with pytest.raises(RuntimeError, match="float32 CPU"):
        mlstm_native(*cell_inputs("moderate", 5))
    big = cell_inputs("moderate", 3, B=1, NH=1, DQK=72, DV=8, dtype=torch.float32)
    with pytest.raises(RuntimeError, match="heads up to 64"):
        mlstm_native(*big, kernel="lanes")


@needs_native
def test_block_auto_picks_native_for_long_sequences_and_small_heads():
    small = MLSTMBlock(32, 512, num_heads=4)  # inner 64: heads of 16, the eight-lane kernel
    assert small.cell_for(8, "cpu", torch.float32) == "native"
    assert small.cell_for(47, "cpu", torch.float32) == "native"
    assert small.cell_for(47, "cpu", torch.float64) != "native"
    block = MLSTMBlock(64, 512, num_heads=4)  # inner 128: heads of 32
    large_heads = MLSTMBlock(128, 512, num_heads=4)  # heads of 64
    assert block.cell_for(200, "cpu", torch.float64) != "native"
    assert block.cell_for(200) != "native"  # no dtype (the MLX twin): never the C kernel
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)  # a pool worker: the row kernel always for heads of 32
        assert block.cell_for(200, "cpu", torch.float32) == "native"
        assert block.cell_for(8, "cpu", torch.float32) == "native"
        assert large_heads.cell_for(64, "cpu", torch.float32) == "parallel"
        assert large_heads.cell_for(96, "cpu", torch.float32) == "native"
        torch.set_num_threads(2)  # the torch forms gain more from threads
        assert block.cell_for(200, "cpu", torch.float32) == "native"
        assert block.cell_for(64, "cpu", torch.float32) != "native"
        assert large_heads.cell_for(128, "cpu", torch.float32) == "parallel"
        assert large_heads.cell_for(256, "cpu", torch.float32) == "native"
    finally:
        torch.set_num_threads(threads)
    x = torch.randn(2, 100, 64)
    with torch.no_grad():
        auto = block(x)
        block.cell = "parallel"
        torch.testing.assert_close(auto, block(x), rtol=1e-4, atol=1e-4)


def test_block_auto_picks_parallel_for_short_and_chunkwise_for_long_sequences():
    block = MLSTMBlock(64, 512, chunk_size=32)
    limit = AUTO_PARALLEL_MAX_CHUNKS * 32
    assert block.cell_for(1) == "parallel"
    assert block.cell_for(limit) == "parallel"
    assert block.cell_for(limit + 1) == "chunkwise"
    assert block.cell_for(limit + 1, "cuda") == "parallel"  # GPUs keep the parallel form longer
    assert block.cell_for(100_000, "cuda") == "chunkwise"
    assert MLSTMBlock(64, 512, cell="parallel").cell_for(4096) == "parallel"


@pytest.mark.parametrize(
    "E, heads, proj_factor, kernel, qkv_block",
    [(64, 4, 2.0, 4, 4), (128, 4, 2.0, 4, 4), (48, 2, 1.5, 3, 8), (100, 8, 2.0, 4, 2)],
)
def test_block_parameter_count_and_state_size(E, heads, proj_factor, kernel, qkv_block):
    kw = dict(num_heads=heads, proj_factor=proj_factor, conv_kernel=kernel)
    block = MLSTMBlock(E, 32, qkv_block_size=qkv_block, **kw)
    inner = 64 * math.ceil(proj_factor * E / 64)
    assert block.inner_dim == inner
    assert block.num_params() == expected_num_params(E, inner, heads, kernel, qkv_block)
    head = inner // heads
    state = heads * (head * head + head + 1) + (kernel - 1) * inner
    assert block.state_size(16) == block.state_size(4096) == state


def test_block_parameter_count_at_benchmark_size():
    # d_model 128: inner 256, 4 heads of 64
    assert MLSTMBlock(128, 256).num_params() == 109_448


def test_block_initialisation():
    E, num_blocks = 128, 4
    block = MLSTMBlock(E, 32, num_heads=8, num_blocks=num_blocks)
    torch.testing.assert_close(block.fgate.bias.detach(), torch.linspace(3.0, 6.0, 8))
    assert torch.all(block.fgate.weight == 0) and torch.all(block.igate.weight == 0)
    assert torch.all(block.learnable_skip == 1) and torch.all(block.outnorm_weight == 1)
    assert block.igate.bias.abs().max() < 1.0  # N(0, 0.1)
    small = math.sqrt(2 / (5 * E))
    for w in (block.proj_up.weight, block.q_proj.weight, block.k_proj.weight):
        assert abs(w.std().item() / small - 1) < 0.1
    wang = 2 / num_blocks / math.sqrt(E)
    assert abs(block.proj_down.weight.std().item() / wang - 1) < 0.1
    assert block.proj_up.bias is None and block.proj_down.bias is None


def test_block_initial_input_gate_bias_spread():
    block = MLSTMBlock(64, 32, num_heads=64)  # 64 heads of 2: enough samples for the spread
    assert 0.05 < block.igate.bias.std().item() < 0.2


@pytest.mark.parametrize(
    "kw",
    [
        {"num_heads": 3},  # inner 128 not divisible by 3
        {"num_heads": 0},
        {"qkv_block_size": 3},
        {"conv_kernel": 0},
        {"chunk_size": 0},
        {"proj_factor": -1.0},
        {"cell": "fast"},
    ],
)
def test_block_rejects_bad_options_with_one_line(kw):
    with pytest.raises(BlockError) as info:
        MLSTMBlock(64, 32, **kw)
    message = str(info.value)
    assert "\n" not in message and message.startswith("mlstm:")


def test_block_matches_the_official_xlstm_block():
    """Same weights, same outputs as NX-AI's mLSTMBlock (where the xlstm package is installed).

    The official norms store their weight as ``1 + w``; ours store the weight itself (the map is
    ``_official_xlstm.weight_map``). The only other difference, the parallel form's stabiliser,
    acts through eps alone.
    """
    pytest.importorskip("xlstm")
    from mad_search.bench import _official_xlstm

    E, S = 64, 40
    official = _official_xlstm.build("mlstm", E, S).double()
    ours = MLSTMBlock(E, S, chunk_size=16).double()
    with torch.no_grad():
        for p in official.parameters():  # random weights everywhere, gates included
            p.normal_(0.0, 0.05 if p.dim() > 1 else 0.5)
    _official_xlstm.copy_weights("mlstm", official, ours)  # checks it covers every parameter
    with torch.no_grad():
        x = torch.randn(2, S, E, dtype=torch.float64)
        branch = official(x) - x  # compare the residual branch, not x itself
        for cell_form in ("parallel", "chunkwise", "recurrent"):
            ours.cell = cell_form
            torch.testing.assert_close(ours(x) - x, branch, rtol=1e-6, atol=1e-9, msg=cell_form)


# ---------------------------------------------------------------------------------------------
# the headwise (block-diagonal) projections: the C kernel and the grouped convolution against
# the explicit block-diagonal matrix


def _block_diagonal(weight):
    return torch.block_diag(*weight.unbind(0))  # (dim, dim): y = x @ W_full.T


@pytest.mark.parametrize("impl", ["torch", pytest.param("native", marks=needs_native)])
@pytest.mark.parametrize("dim,block,shape", [
    (64, 4, (3, 7)), (256, 4, (2, 33)), (24, 8, (2, 5)), (30, 5, (1, 1)), (12, 4, (5, 3))])
def test_headwise_linear_matches_block_diagonal_matrix(impl, dim, block, shape):
    # block 4 with dim a multiple of 8 takes the kernel's vector path (12: not a multiple of 8)
    layer = HeadwiseLinear(dim, block)
    torch.nn.init.normal_(layer.weight)
    x = torch.randn(*shape, dim, requires_grad=True)
    dy = torch.randn(*shape, dim)
    y = layer(x, impl=impl)
    gx, gw = torch.autograd.grad(y, (x, layer.weight), dy)
    x64, w64 = x.detach().double().requires_grad_(), layer.weight.detach().double()
    w64.requires_grad_()
    y_ref = x64 @ _block_diagonal(w64).T
    gx_ref, gw_ref = torch.autograd.grad(y_ref, (x64, w64), dy.double())
    torch.testing.assert_close(y, y_ref.float(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(gx, gx_ref.float(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(gw, gw_ref.float(), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("impl", ["torch", pytest.param("native", marks=needs_native)])
@pytest.mark.parametrize("dim,block", [(64, 4), (12, 4), (30, 5)])
def test_headwise_qkv_matches_three_block_diagonal_maps(impl, dim, block):
    # q, k from x_c and v from x_m in one node: x_c's gradient is the sum of q's and k's parts
    from blocks.mlstm import headwise_qkv

    projs = [HeadwiseLinear(dim, block) for _ in range(3)]
    for proj in projs:
        torch.nn.init.normal_(proj.weight)
    x_c, x_m = (torch.randn(2, 9, dim, requires_grad=True) for _ in range(2))
    dys = [torch.randn(2, 9, dim) for _ in range(3)]
    outs = headwise_qkv(x_c, x_m, *projs, impl=impl)
    leaves = [x_c, x_m, *(proj.weight for proj in projs)]
    grads = torch.autograd.grad(outs, leaves, dys)
    leaves64 = [t.detach().double().requires_grad_() for t in leaves]
    xc64, xm64, *ws64 = leaves64
    refs = [x @ _block_diagonal(w).T for x, w in zip((xc64, xc64, xm64), ws64)]
    grads_ref = torch.autograd.grad(refs, leaves64, [dy.double() for dy in dys])
    for y, y_ref in zip(outs, refs):
        torch.testing.assert_close(y, y_ref.float(), rtol=1e-5, atol=1e-5)
    for g, g_ref in zip(grads, grads_ref):
        torch.testing.assert_close(g, g_ref.float(), rtol=1e-4, atol=1e-4)


@needs_native
def test_native_headwise_kernel_builds_where_a_compiler_exists():
    from blocks.mlstm import _native_headwise_library

    assert _native_headwise_library() is not None, native.status.get("headwise")


@needs_native
def test_native_headwise_splits_rows_over_threads():
    layer = HeadwiseLinear(64, 4)
    torch.nn.init.normal_(layer.weight)
    x, dy = torch.randn(5, 11, 64), torch.randn(5, 11, 64)
    results = []
    for threads in (1, 2):
        with torch_threads(threads):
            w = layer.weight.detach().clone().requires_grad_()
            layer.weight = torch.nn.Parameter(w)
            y = layer(x, impl="native")
            results.append((y, torch.autograd.grad(y, layer.weight, dy)[0]))
    torch.testing.assert_close(results[0][0], results[1][0])
    torch.testing.assert_close(results[0][1], results[1][1], rtol=1e-5, atol=1e-5)


# --------------------------------------------------------------------------------------------
# the block's gates and output gate: C kernels against their torch twins in float64


def _grads_of(fn, inputs, dy, dtype, **kw):
    leaves = [t.detach().to(dtype).requires_grad_() for t in inputs]
    y = fn(*leaves, **kw)
    return [y.double()] + [g.double() for g in torch.autograd.grad(y, leaves, dy.to(dtype))]


def _assert_rel(got, want, rel):
    for a, b in zip(got, want):
        err = ((a - b).abs().max() / b.abs().max().clamp_min(1e-12)).item()
        assert err < rel, f"relative error {err:.2e}"


@needs_native
@pytest.mark.parametrize("threads", [1, 3])
@pytest.mark.parametrize("B, S, I, DH", [(3, 11, 64, 16), (2, 9, 40, 5), (1, 7, 96, 32)])
def test_native_output_gate_matches_torch(B, S, I, DH, threads):
    # (GN(h) w + s x) silu(z): head sizes below, at and above one vector, odd ones included
    inputs = [torch.randn(B, S, I) for _ in range(3)] + [torch.randn(I), torch.randn(I)]
    dy = torch.randn(B, S, I)
    want = _grads_of(mlstm_output, inputs, dy, torch.float64, head_dim=DH, impl="torch")
    torch.set_num_threads(threads)
    got = _grads_of(mlstm_output, inputs, dy, torch.float32, head_dim=DH, impl="native")
    _assert_rel(got, want, 2e-6)


@pytest.mark.parametrize("B, S, I, J", [(3, 11, 64, 8), (2, 5, 12, 2), (1, 7, 128, 32)])
def test_gates_equal_the_linear_map_of_the_concatenation(B, S, I, J):
    # q, k, v as views of one wider tensor; outputs and gradients in float64
    wide = torch.randn(B, S, 3 * I + 2, dtype=torch.float64)
    inputs = [wide[..., :I], wide[..., I:2 * I], wide[..., 2 * I:3 * I],
              torch.randn(J, 3 * I, dtype=torch.float64), torch.randn(J, dtype=torch.float64)]
    dg = torch.randn(B, S, J, dtype=torch.float64)

    def concatenated(q, k, v, W, b):
        return F.linear(torch.cat([q, k, v], -1), W, b)

    want = _grads_of(concatenated, inputs, dg, torch.float64)
    got = _grads_of(mlstm_gates, inputs, dg, torch.float64)
    _assert_rel(got, want, 1e-12)


def test_output_kernel_refuses_what_it_cannot_run():
    q = torch.randn(2, 3, 12)
    with pytest.raises(ValueError, match="impl must be"):
        mlstm_output(q, q, q, torch.ones(12), torch.ones(12), 4, impl="fast")
    with pytest.raises(RuntimeError, match="not float32 on the CPU"):
        mlstm_output(*(t.double() for t in (q, q, q, torch.ones(12), torch.ones(12))), 4,
                     impl="native")


@needs_native
@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("B, S, NH, DH",
                         [(3, 19, 4, 16), (2, 7, 3, 8), (1, 5, 5, 12), (2, 13, 2, 64)])
def test_fused_gates_and_cell_equal_the_two_steps(B, S, NH, DH, threads, kernel):
    # the block's fused node (gates, cell, and the gates' gradients added into the cell's in
    # place) against mlstm_gates then mlstm_recurrent, in float64
    from blocks.mlstm import _NativeGatedMLSTM

    I = NH * DH
    q, k = torch.randn(B, S, I).abs(), torch.randn(B, S, I).abs()  # q . n without cancellation
    inputs = [q, k, torch.randn(B, S, I), 0.1 * torch.randn(2 * NH, 3 * I),
              torch.cat([torch.randn(NH), 3.0 + torch.randn(NH)])]
    dh = torch.randn(B, NH, S, DH)

    def two_steps(q, k, v, W, b):
        g = mlstm_gates(q, k, v, W, b)

        def heads(t):
            return t.view(B, S, NH, DH).transpose(1, 2)

        return mlstm_recurrent(heads(q), heads(k), heads(v), g[..., :NH].transpose(1, 2),
                               g[..., NH:].transpose(1, 2))

    def fused(q, k, v, W, b):
        return _NativeGatedMLSTM.apply(q, k, v, W, b, NH, 1e-6, kernel)

    want = _grads_of(two_steps, inputs, dh, torch.float64)
    torch.set_num_threads(threads)
    try:
        got = _grads_of(fused, inputs, dh, torch.float32)
    finally:
        torch.set_num_threads(1)
    _assert_rel(got, want, 1e-4)
