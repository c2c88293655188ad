"""bigmodel.scaled_dot_product_attention and bigmodel::attention against the float64 reference.

Without a GPU the Triton kernels run through the interpreter on CPU tensors (the 'triton'
backend), in fp32 and fp16 at small sizes; the tests marked cuda repeat the checks at real sizes
in bf16/fp16/fp32 on the H200. Accuracy follows the FlashAttention rule (tests/tolerances.py):
our error against float64 at most 2x (gradients 3x) the error of the same computation done by
PyTorch in the same dtype.
"""
import math

import pytest
import torch
import torch.nn.functional as F

import bigmodel
from bigmodel.ops import _registry
from bigmodel.ops import attention as attn_ops
from bigmodel.reference import ref_attention
from tolerances import FORWARD_FACTOR, assert_attention_grads, assert_flash_rule, max_err

INTERP_DTYPES = (torch.float32, torch.float16)


def _run(fn, q, k, v, grad, **kwargs):
    """Output and input gradients of fn(q, k, v, **kwargs), on fresh leaves."""
    q, k, v = (t.detach().requires_grad_() for t in (q, k, v))
    out = fn(q, k, v, **kwargs)
    out.backward(grad)
    return out.detach(), q.grad, k.grad, v.grad


def _ours(q, k, v, **kwargs):
    with bigmodel.use_backend("triton"):
        return bigmodel.scaled_dot_product_attention(q, k, v, **kwargs)


def _ref(q, k, v, attn_mask=None, is_causal=False, scale=None, enable_gqa=False, dropout_keep=None,
         dropout_p=0.0):
    if attn_mask is not None and attn_mask.is_floating_point():
        attn_mask = attn_mask.to(q.dtype)
    if dropout_keep is not None:
        dropout_keep = dropout_keep.to(q.dtype)
    return ref_attention(q, k, v, attn_mask, dropout_p, is_causal, scale, enable_gqa, dropout_keep)


def check(q, k, v, dtype, what="", **kwargs):
    """Forward and backward of the Triton path against float64, by the FlashAttention rule."""
    q, k, v = (t.to(dtype) for t in (q, k, v))
    grad = torch.randn(_ref(q.double(), k.double(), v.double(), **kwargs).shape).to(dtype)
    ours = _run(_ours, q, k, v, grad, **kwargs)
    ref64 = _run(_ref, q.double(), k.double(), v.double(), grad.double(), **kwargs)
    same = _run(_ref, q, k, v, grad, **kwargs)
    assert ours[0].shape == ref64[0].shape and ours[0].dtype == dtype
    assert_flash_rule(ours[0], same[0], ref64[0], dtype, FORWARD_FACTOR, f"{what} output")
    assert_attention_grads(ours[1:], same[1:], ref64[1:], dtype, what)
    return ours


# ---------------------------------------------------------------------------------------------
# Accuracy of the Triton kernels (interpreter) against float64.

SHAPES = [
    # (B, H, L, S, E, Ev)
    (1, 1, 1, 1, 16, 16),
    (2, 2, 17, 17, 40, 40),
    (1, 2, 17, 33, 72, 72),
    (2, 1, 40, 9, 32, 32),     # L > S: causal rows past S see every key
    (1, 3, 5, 30, 40, 24),     # Ev != E
    (1, 1, 113, 113, 64, 64),
]


@pytest.mark.parametrize("dtype", INTERP_DTYPES, ids=str)
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_matches_reference(shape, causal, dtype):
    if shape[2] == 113 and dtype == torch.float32 and not causal:
        pytest.skip("one 113-long case per dtype keeps the interpreter time down")
    B, H, L, S, E, Ev = shape
    q, k, v = torch.randn(B, H, L, E), torch.randn(B, H, S, E), torch.randn(B, H, S, Ev)
    check(q, k, v, dtype, f"{shape} causal={causal}", is_causal=causal)


@pytest.mark.parametrize("dtype", INTERP_DTYPES, ids=str)
def test_scale(dtype):
    q, k, v = torch.randn(1, 2, 9, 16), torch.randn(1, 2, 12, 16), torch.randn(1, 2, 12, 16)
    check(q, k, v, dtype, "scale=0.3", scale=0.3)


@pytest.mark.parametrize("dtype", INTERP_DTYPES, ids=str)
@pytest.mark.parametrize("mask_shape", [(20, 30), (2, 1, 20, 30), (1, 3, 1, 30), (3, 20, 30)],
                         ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("kind", ["bool", "float"])
def test_masks(kind, mask_shape, dtype):
    q, k, v = torch.randn(2, 3, 20, 32), torch.randn(2, 3, 30, 32), torch.randn(2, 3, 30, 16)
    if kind == "bool":
        mask = torch.rand(mask_shape) > 0.3
    else:
        mask = torch.randn(mask_shape).masked_fill(torch.rand(mask_shape) < 0.2, float("-inf")).to(dtype)
    check(q, k, v, dtype, f"{kind} mask {mask_shape}", attn_mask=mask)


def test_float32_mask_with_fp16_query():
    # torch accepts a float32 mask for a 16-bit query; it is cast to the query's dtype
    q, k, v = (torch.randn(1, 2, n, 16).half() for n in (9, 12, 12))
    mask = torch.randn(9, 12)
    out = _ours(q, k, v, attn_mask=mask)
    assert out.dtype == torch.float16
    assert max_err(out, _ref(q.double(), k.double(), v.double(), attn_mask=mask.half().double())) < 2e-3


@pytest.mark.parametrize("dtype", INTERP_DTYPES, ids=str)
@pytest.mark.parametrize("kind", ["bool", "float"])
def test_fully_masked_rows_give_zero(kind, dtype):
    q, k, v = torch.randn(2, 2, 19, 32), torch.randn(2, 2, 21, 32), torch.randn(2, 2, 21, 32)
    visible = torch.rand(2, 1, 19, 21) > 0.4
    visible[:, :, 3] = False   # rows 3 and 18 see nothing, in every batch and head
    visible[:, :, 18] = False
    visible[1] = False         # batch 1 sees nothing at all
    mask = visible if kind == "bool" else torch.zeros(visible.shape).masked_fill(~visible, float("-inf")).to(dtype)
    out, dq, dk, dv = check(q, k, v, dtype, f"{kind} fully masked", attn_mask=mask)
    assert (out[:, :, 3] == 0).all() and (out[:, :, 18] == 0).all() and (out[1] == 0).all()
    assert (dq[:, :, 3] == 0).all() and (dq[1] == 0).all() and (dk[1] == 0).all() and (dv[1] == 0).all()
    assert torch.isfinite(out).all() and all(torch.isfinite(g).all() for g in (dq, dk, dv))


@pytest.mark.parametrize("dtype", INTERP_DTYPES, ids=str)
@pytest.mark.parametrize("hq,hkv,causal", [(4, 2, True), (6, 1, False), (4, 4, True)])
def test_gqa(hq, hkv, causal, dtype):
    q, k, v = torch.randn(2, hq, 17, 40), torch.randn(2, hkv, 23, 40), torch.randn(2, hkv, 23, 40)
    check(q, k, v, dtype, f"gqa {hq}/{hkv}", is_causal=causal, enable_gqa=True)


@pytest.mark.parametrize("dtype", INTERP_DTYPES, ids=str)
def test_3d_and_5d_and_2d_inputs(dtype):
    check(torch.randn(3, 17, 40), torch.randn(3, 9, 40), torch.randn(3, 9, 24), dtype, "3-D", is_causal=True)
    check(torch.randn(2, 2, 2, 11, 32), torch.randn(2, 2, 2, 13, 32), torch.randn(2, 2, 2, 13, 32), dtype, "5-D",
          attn_mask=torch.rand(11, 13) > 0.2)
    check(torch.randn(2, 4, 3, 11, 32), torch.randn(2, 4, 1, 13, 32), torch.randn(2, 4, 1, 13, 32), dtype,
          "5-D gqa", enable_gqa=True)
    check(torch.randn(7, 16), torch.randn(5, 16), torch.randn(5, 16), dtype, "2-D")


@pytest.mark.parametrize("dtype", INTERP_DTYPES, ids=str)
def test_broadcast_batch(dtype):
    # key/value shared by the batch (batch dim 1): expanded with zero strides, never copied
    q, k, v = torch.randn(3, 2, 9, 32), torch.randn(1, 2, 12, 32), torch.randn(1, 2, 12, 32)
    check(q, k, v, dtype, "broadcast batch")


@pytest.mark.parametrize("dtype", INTERP_DTYPES, ids=str)
def test_transposed_inputs_are_read_in_place(dtype):
    # (B, L, H, E) projections viewed as (B, H, L, E), as MultiheadAttention produces them
    B, L, S, H, E = 2, 19, 23, 3, 40
    q = torch.randn(B, L, H, E).to(dtype).transpose(1, 2)
    k = torch.randn(B, S, H, E).to(dtype).transpose(1, 2)
    v = torch.randn(B, S, H, E).to(dtype).transpose(1, 2)
    q4, k4, v4, _, _ = attn_ops._layout(q, k, v, None, False)
    for a, b in ((q4, q), (k4, k), (v4, v)):
        assert a.data_ptr() == b.data_ptr() and a.stride() == b.stride()
    check(q, k, v, dtype, "transposed", is_causal=True)


def test_5d_layout_is_a_view():
    q = torch.randn(2, 3, 11, 4, 16).transpose(2, 3)   # (A, B, H, L, E) from (A, B, L, H, E)
    q4, _, _, _, lead = attn_ops._layout(q, q, q, None, False)
    assert q4.shape == (6, 4, 11, 16) and q4.data_ptr() == q.data_ptr() and lead == (2, 3, 4)
    mask = torch.rand(11, 11) > 0.5
    _, _, _, m4, _ = attn_ops._layout(q, q, q, mask, False)
    assert m4.shape == (6, 4, 11, 11) and m4.stride()[:2] == (0, 0) and m4.data_ptr() == mask.data_ptr()


def test_empty_inputs():
    q, k, v = torch.randn(0, 2, 5, 16), torch.randn(0, 2, 7, 16), torch.randn(0, 2, 7, 16)
    with bigmodel.use_backend("triton"):
        out = bigmodel.scaled_dot_product_attention(q, k, v)
    assert out.shape == (0, 2, 5, 16)
    q, k, v = (torch.randn(1, 2, 5, 16, requires_grad=True), torch.randn(1, 2, 0, 16, requires_grad=True),
               torch.randn(1, 2, 0, 8, requires_grad=True))
    with bigmodel.use_backend("triton"):
        out = bigmodel.scaled_dot_product_attention(q, k, v)
    assert out.shape == (1, 2, 5, 8) and (out == 0).all()
    out.sum().backward()
    assert (q.grad == 0).all()
    q, k, v = torch.randn(1, 2, 5, 0), torch.randn(1, 2, 7, 0), torch.randn(1, 2, 7, 8)
    with bigmodel.use_backend("triton"):
        out = bigmodel.scaled_dot_product_attention(q, k, v)  # E = 0: uniform weights
    torch.testing.assert_close(out, v.mean(-2, keepdim=True).expand(1, 2, 5, 8))


# ---------------------------------------------------------------------------------------------
# Dropout: in-kernel Philox, reproducible, the same mask in the backward.


@pytest.fixture
def recorded_seeds(monkeypatch):
    seeds = []
    draw = attn_ops._draw_rng_seed

    def recording(p):
        seed = draw(p)
        seeds.append(seed)
        return seed

    monkeypatch.setattr(attn_ops, "_draw_rng_seed", recording)
    return seeds


@pytest.mark.parametrize("dtype", INTERP_DTYPES, ids=str)
@pytest.mark.parametrize("causal,hkv", [(False, 2), (True, 1)])
def test_dropout_matches_reference_with_the_kernel_mask(recorded_seeds, causal, hkv, dtype):
    from bigmodel.kernels import attention as kernels

    B, H, L, S, E, p = 2, 2, 17, 23, 32, 0.3
    q, k, v = torch.randn(B, H, L, E), torch.randn(B, hkv, S, E), torch.randn(B, hkv, S, E)
    grad = torch.randn(B, H, L, E).to(dtype)
    q, k, v = (t.to(dtype) for t in (q, k, v))
    kwargs = dict(is_causal=causal, enable_gqa=True, dropout_p=p)
    ours = _run(_ours, q, k, v, grad, **kwargs)
    keep = kernels.dropout_keep_mask(B * H, L, S, p, recorded_seeds[-1], q.device).view(B, H, L, S)
    ref_kwargs = dict(is_causal=causal, enable_gqa=True, dropout_p=p, dropout_keep=keep)
    ref64 = _run(_ref, q.double(), k.double(), v.double(), grad.double(), **ref_kwargs)
    same = _run(_ref, q, k, v, grad, **ref_kwargs)
    assert_flash_rule(ours[0], same[0], ref64[0], dtype, FORWARD_FACTOR, "dropout output")
    assert_attention_grads(ours[1:], same[1:], ref64[1:], dtype, "dropout")


def test_dropout_is_reproducible_and_fair():
    from bigmodel.kernels import attention as kernels

    q, k, v = torch.randn(1, 2, 16, 16), torch.randn(1, 2, 16, 16), torch.randn(1, 2, 16, 16)
    outs = []
    for seed in (0, 0, 1):
        torch.manual_seed(seed)
        outs.append(_ours(q, k, v, dropout_p=0.5))
    assert torch.equal(outs[0], outs[1]) and not torch.equal(outs[0], outs[2])
    # p = 0 is no dropout at all; the keep mask keeps about 1 - p of the entries, independently.
    torch.testing.assert_close(_ours(q, k, v, dropout_p=0.0), _ref(q, k, v), atol=1e-5, rtol=1e-5)
    p, n = 0.3, 8 * 64 * 64
    keep = kernels.dropout_keep_mask(8, 64, 64, p, torch.tensor([2**40 + 5, 2**33]), q.device)
    sigma = math.sqrt(p * (1 - p) / n)
    assert abs(keep.float().mean().item() - (1 - p)) < 5 * sigma
    rows = keep.float().mean(-1)   # no row/column structure: each row keeps about 1 - p too
    assert rows.std().item() < 3 * math.sqrt(p * (1 - p) / 64)


def test_reference_backend_dropout_is_reproducible():
    q = torch.randn(2, 3, 8, 16)
    with bigmodel.use_backend("reference"):
        torch.manual_seed(3)
        a = bigmodel.scaled_dot_product_attention(q, q, q, dropout_p=0.4)
        torch.manual_seed(3)
        b = bigmodel.scaled_dot_product_attention(q, q, q, dropout_p=0.4)
    assert torch.equal(a, b)


# ---------------------------------------------------------------------------------------------
# NaN semantics (bigmodel/reference.py): a NaN reaches exactly the outputs it enters.


@pytest.mark.parametrize("dtype", INTERP_DTYPES, ids=str)
def test_nan_propagation(dtype):
    L, S = 20, 24
    q, k, v = (torch.randn(1, 2, n, 16).to(dtype) for n in (L, S, S))
    cases = []
    q1 = q.clone(); q1[0, 0, 5, 3] = float("nan")
    cases.append(("query row", (q1, k, v), dict(is_causal=True)))
    k1 = k.clone(); k1[0, 1, 9, 0] = float("nan")
    cases.append(("key row, causal", (q, k1, v), dict(is_causal=True)))
    cases.append(("key row, full", (q, k1, v), {}))
    hidden = torch.ones(L, S, dtype=torch.bool); hidden[:, 9] = False
    cases.append(("key row, masked out", (q, k1, v), dict(attn_mask=hidden)))
    v1 = v.clone(); v1[0, 0, 4, 7] = float("nan")
    cases.append(("value entry", (q, k, v1), {}))
    for what, (a, b, c), kwargs in cases:
        ours = _ours(a, b, c, **kwargs)
        ref = _ref(a.double(), b.double(), c.double(), **kwargs)
        assert torch.equal(torch.isnan(ours), torch.isnan(ref)), what
        assert max_err(ours, ref) < (1e-5 if dtype == torch.float32 else 5e-3), what
    assert torch.isnan(_ours(q1, k, v, is_causal=True)[0, 0, 5]).all()
    assert not torch.isnan(_ours(q, k1, v, is_causal=True)[0, 1, :9]).any()


# ---------------------------------------------------------------------------------------------
# Errors.


def _sdpa(*args, **kwargs):
    return bigmodel.scaled_dot_product_attention(*args, **kwargs)


def test_bad_inputs_raise_clear_errors():
    q, k, v = torch.randn(2, 4, 5, 16), torch.randn(2, 4, 7, 16), torch.randn(2, 4, 7, 8)
    with pytest.raises(ValueError, match="embedding size"):
        _sdpa(q, torch.randn(2, 4, 7, 12), v)
    with pytest.raises(ValueError, match="sequence length"):
        _sdpa(q, k, torch.randn(2, 4, 6, 8))
    with pytest.raises(ValueError, match="enable_gqa"):
        _sdpa(q, torch.randn(2, 2, 7, 16), torch.randn(2, 2, 7, 8))
    with pytest.raises(ValueError, match="multiple"):
        _sdpa(q, torch.randn(2, 3, 7, 16), torch.randn(2, 3, 7, 8), enable_gqa=True)
    with pytest.raises(ValueError, match="same number of heads"):
        _sdpa(q, k, torch.randn(2, 2, 7, 8))
    with pytest.raises(ValueError, match="batch dims"):
        _sdpa(q, torch.randn(3, 4, 7, 16), torch.randn(3, 4, 7, 8))
    with pytest.raises(TypeError, match="same dtype"):
        _sdpa(q, k.double(), v)
    with pytest.raises(TypeError, match="floating point"):
        _sdpa(q.long(), k.long(), v.long())
    with pytest.raises(ValueError, match="meta"):
        _sdpa(q, k.to("meta"), v)
    with pytest.raises(ValueError, match="at least 2 dimensions"):
        _sdpa(torch.randn(16), k, v)
    with pytest.raises(TypeError, match="key must be a Tensor"):
        _sdpa(q, [1.0], v)
    with pytest.raises(TypeError, match="query must be a Tensor"):
        _sdpa(None, k, v)
    with pytest.raises(ValueError, match="does not broadcast"):
        _sdpa(q, k, v, attn_mask=torch.ones(5, 6, dtype=torch.bool))
    with pytest.raises(TypeError, match="attn_mask must be bool"):
        _sdpa(q, k, v, attn_mask=torch.ones(5, 7, dtype=torch.int32))
    with pytest.raises(TypeError, match="attn_mask must be bool"):
        _sdpa(q, k, v, attn_mask=torch.ones(5, 7, dtype=torch.float64))
    with pytest.raises(TypeError, match="attn_mask must be bool"):
        _sdpa(q.half(), k.half(), v.half(), attn_mask=torch.ones(5, 7, dtype=torch.bfloat16))
    with pytest.raises(ValueError, match="not both"):
        _sdpa(q, k, v, attn_mask=torch.ones(5, 7, dtype=torch.bool), is_causal=True)
    for p in (1.0, -0.1, 1.5):
        with pytest.raises(ValueError, match="dropout_p"):
            _sdpa(q, k, v, dropout_p=p)
    with bigmodel.use_backend("triton"), pytest.raises(ValueError, match="head dims up to 256"):
        _sdpa(torch.randn(1, 1, 4, 264), torch.randn(1, 1, 4, 264), torch.randn(1, 1, 4, 8))


# ---------------------------------------------------------------------------------------------
# The registered op: opcheck, torch.compile, autocast, backends.


def _cpu_kernel_registered():
    return _registry.has_ops() and attn_ops._cpu_kernel_registered()


@pytest.fixture
def cpu_op():
    """bigmodel::attention on CPU tensors: the C++ kernel when it is registered, else the Triton
    kernels through the interpreter, registered on CPU for the duration of the test."""
    if not _registry.has_ops():
        pytest.skip("bigmodel._C is not built")
    if _cpu_kernel_registered():
        yield "cpp"
        return
    from bigmodel.kernels import attention as kernels

    lib = torch.library.Library("bigmodel", "IMPL")
    lib.impl("attention", kernels.attention_fwd, "CPU")
    lib.impl("attention_backward", kernels.attention_bwd, "CPU")
    try:
        yield "triton-interpreter"
    finally:
        lib._destroy()


def _op_args(B=2, H=4, HKV=2, L=9, S=13, E=16, Ev=8, dtype=torch.float32, mask=None, causal=False, p=0.0):
    q = torch.randn(B, H, L, E, dtype=dtype, requires_grad=True)
    k = torch.randn(B, HKV, S, E, dtype=dtype, requires_grad=True)
    v = torch.randn(B, HKV, S, Ev, dtype=dtype, requires_grad=True)
    seed = torch.tensor([2**40 + 1, 2**33 + 7]) if p else None
    return (q, k, v, mask, p, causal, 1 / math.sqrt(E), seed)


def test_opcheck(cpu_op):
    samples = [
        _op_args(),
        _op_args(causal=True, HKV=4),
        _op_args(mask=(torch.rand(9, 13) > 0.3).expand(2, 4, 9, 13)),
        _op_args(mask=torch.randn(2, 4, 9, 13), p=0.2),
    ]
    for args in samples:
        torch.library.opcheck(torch.ops.bigmodel.attention.default, args)


def test_torch_compile_fullgraph(cpu_op):
    def f(q, k, v, mask):
        a = bigmodel.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
        b = bigmodel.scaled_dot_product_attention(q.transpose(1, 2).transpose(1, 2), k, v, attn_mask=mask,
                                                  enable_gqa=True, dropout_p=0.1)
        return a + b

    torch._dynamo.reset()
    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    q, k, v = torch.randn(2, 4, 9, 16), torch.randn(2, 2, 11, 16), torch.randn(2, 2, 11, 16)
    mask = torch.rand(9, 11) > 0.3
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    with bigmodel.use_backend("cpp"):  # the registered op on CPU tensors
        out = compiled(*leaves, mask)
        out.sum().backward()
        assert out.shape == (2, 4, 9, 16) and all(t.grad is not None for t in leaves)
        a = compiled(q, k, v, torch.ones(9, 11, dtype=torch.bool))
    assert torch.isfinite(a).all()
    b = compiled(q, k, v, mask)  # 'auto': the C++ kernel, or the reference until it is registered
    assert b.shape == (2, 4, 9, 16)


def test_autocast_cpu():
    q, k, v = torch.randn(1, 2, 9, 16), torch.randn(1, 2, 11, 16), torch.randn(1, 2, 11, 16)
    with torch.autocast("cpu", dtype=torch.float16):
        out = _ours(q, k, v)
    assert out.dtype == torch.float16
    ref = _ref(q.half().double(), k.half().double(), v.half().double())
    assert max_err(out, ref) < 2e-3


def test_backends_agree():
    q, k, v = torch.randn(2, 2, 9, 16), torch.randn(2, 2, 11, 16), torch.randn(2, 2, 11, 16)
    with bigmodel.use_backend("reference"):
        ref = bigmodel.scaled_dot_product_attention(q, k, v, is_causal=True)
    torch.testing.assert_close(ref, F.scaled_dot_product_attention(q, k, v, is_causal=True), atol=1e-6, rtol=1e-6)
    auto = bigmodel.scaled_dot_product_attention(q, k, v, is_causal=True)  # C++ kernel or, until it lands, reference
    torch.testing.assert_close(auto, ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(_ours(q, k, v, is_causal=True), ref, atol=1e-5, rtol=1e-5)


def test_fake_kernels():
    if not _registry.has_ops():
        pytest.skip("bigmodel._C is not built")
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        q, k, v = torch.empty(2, 4, 9, 16), torch.empty(2, 2, 13, 16), torch.empty(2, 2, 13, 8)
        out, lse = torch.ops.bigmodel.attention(q, k, v, None, 0.0, False, 0.25, None)
        assert out.shape == (2, 4, 9, 8) and lse.shape == (2, 4, 9) and lse.dtype == torch.float32
        dq, dk, dv = torch.ops.bigmodel.attention_backward(out, q, k, v, out, lse, None, 0.0, False, 0.25, None)
        assert (dq.shape, dk.shape, dv.shape) == (q.shape, k.shape, v.shape)


# ---------------------------------------------------------------------------------------------
# The H200: real sizes, bf16/fp16/fp32 (run by bench/device_check.sh).

CUDA_DTYPES = (torch.bfloat16, torch.float16, torch.float32)


@pytest.fixture(autouse=True)
def _no_autotuning(request, monkeypatch):
    # Tests want every variant checked, not timed: one config each (the preferred one that fits).
    if "cuda" in request.keywords:
        monkeypatch.setenv("BIGMODEL_AUTOTUNE", "0")


def _cuda_check(q, k, v, dtype, **kwargs):
    """As check(), on CUDA, with torch's own SDPA (its default backend) as the same-dtype error."""
    q, k, v = (t.to("cuda", dtype) for t in (q, k, v))
    grad = torch.randn(*q.shape[:-1], v.shape[-1], device="cuda").to(dtype)
    ours = _run(bigmodel.scaled_dot_product_attention, q, k, v, grad, **kwargs)
    ref64 = _run(_ref, q.double(), k.double(), v.double(), grad.double(), **kwargs)
    same = _run(F.scaled_dot_product_attention, q, k, v, grad, **kwargs)
    assert_flash_rule(ours[0], same[0], ref64[0], dtype, FORWARD_FACTOR, "output")
    assert_attention_grads(ours[1:], same[1:], ref64[1:], dtype)
    return ours


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", CUDA_DTYPES, ids=str)
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("L,S,E", [(1024, 1024, 64), (1023, 1023, 128), (257, 1000, 80), (1000, 513, 256),
                                   (113, 300, 40)])
def test_cuda_matches_reference(L, S, E, causal, dtype):
    torch.backends.cuda.matmul.allow_tf32 = False
    q, k, v = torch.randn(2, 4, L, E), torch.randn(2, 4, S, E), torch.randn(2, 4, S, E)
    _cuda_check(q, k, v, dtype, is_causal=causal)


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", CUDA_DTYPES, ids=str)
def test_cuda_masks_gqa_layouts(dtype):
    B, H, L, S, E = 2, 8, 700, 900, 64
    q = torch.randn(B, L, H, E).transpose(1, 2)
    k = torch.randn(B, S, 2, E).transpose(1, 2)
    v = torch.randn(B, S, 2, E).transpose(1, 2)
    _cuda_check(q, k, v, dtype, enable_gqa=True, is_causal=True)
    mask = (torch.rand(B, 1, 1, S) > 0.2).cuda()
    _cuda_check(q, k, v, dtype, enable_gqa=True, attn_mask=mask)
    fmask = torch.randn(L, S).to("cuda", dtype)
    _cuda_check(q, k, v, dtype, enable_gqa=True, attn_mask=fmask)


@pytest.mark.cuda
def test_cuda_tf32_only_when_allowed():
    q, k, v = (torch.randn(1, 4, 512, 64, device="cuda") for _ in range(3))
    ref = _ref(q.double(), k.double(), v.double())
    old = torch.backends.cuda.matmul.allow_tf32
    try:
        torch.backends.cuda.matmul.allow_tf32 = False
        ieee = max_err(bigmodel.scaled_dot_product_attention(q, k, v), ref)
        torch.backends.cuda.matmul.allow_tf32 = True
        tf32 = max_err(bigmodel.scaled_dot_product_attention(q, k, v), ref)
    finally:
        torch.backends.cuda.matmul.allow_tf32 = old
    assert ieee < 1e-5 < tf32 < 1e-2


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", (torch.bfloat16, torch.float16), ids=str)
def test_cuda_dropout_and_determinism(recorded_seeds, dtype):
    from bigmodel.kernels import attention as kernels

    B, H, L, S, E, p = 2, 4, 600, 700, 64, 0.2
    q, k, v = (torch.randn(B, H, n, E, device="cuda", dtype=dtype) for n in (L, S, S))
    grad = torch.randn(B, H, L, E, device="cuda", dtype=dtype)
    torch.manual_seed(7)
    first = _run(bigmodel.scaled_dot_product_attention, q, k, v, grad, dropout_p=p, is_causal=True)
    torch.manual_seed(7)
    second = _run(bigmodel.scaled_dot_product_attention, q, k, v, grad, dropout_p=p, is_causal=True)
    for a, b in zip(first, second):   # same seed: bitwise the same, gradients included (no atomics)
        assert torch.equal(a, b)
    keep = kernels.dropout_keep_mask(B * H, L, S, p, recorded_seeds[-1], q.device).view(B, H, L, S)
    kwargs = dict(is_causal=True, dropout_p=p, dropout_keep=keep)
    ref64 = _run(_ref, q.double(), k.double(), v.double(), grad.double(), **kwargs)
    same = _run(_ref, q, k, v, grad, **kwargs)
    assert_flash_rule(first[0], same[0], ref64[0], dtype, FORWARD_FACTOR, "dropout output")
    assert_attention_grads(first[1:], same[1:], ref64[1:], dtype, "dropout")


@pytest.mark.cuda
def test_cuda_fully_masked_and_nan():
    q, k, v = (torch.randn(1, 2, 300, 64, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
    mask = torch.rand(300, 300, device="cuda") > 0.5
    mask[17] = False
    out = bigmodel.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    out.float().sum().backward()
    assert (out[:, :, 17] == 0).all() and (q.grad[:, :, 17] == 0).all() and torch.isfinite(out).all()
    q2 = q.detach().clone()
    q2[0, 1, 200, 5] = float("nan")
    out = bigmodel.scaled_dot_product_attention(q2, k.detach(), v.detach(), is_causal=True)
    assert torch.isnan(out[0, 1, 200]).all() and not torch.isnan(out[0, 1, :200]).any()
    assert not torch.isnan(out[0, 0]).any() and not torch.isnan(out[0, 1, 201:]).any()


@pytest.mark.cuda
def test_cuda_compile_and_autocast():
    q, k, v = (torch.randn(2, 8, 512, 64, device="cuda", requires_grad=True) for _ in range(3))
    compiled = torch.compile(lambda a, b, c: bigmodel.scaled_dot_product_attention(a, b, c, is_causal=True),
                             fullgraph=True)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        out = compiled(q, k, v)
    assert out.dtype == torch.bfloat16
    out.float().sum().backward()
    ref = _ref(*(t.detach().bfloat16().double() for t in (q, k, v)), is_causal=True)
    assert max_err(out, ref) < 2e-2
