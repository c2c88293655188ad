"""Reliability of both ops beyond "matches the reference on nice inputs", on every path CI runs
(the C++ engine 'cpp' and the Triton kernels under the interpreter 'triton'):

* errors: every row of docs/errors.md is triggered and its exception type and message checked;
* registration: torch.library.opcheck on every op (contiguous, strided, empty, requires_grad
  samples) and float64 gradcheck through the registered backward ops;
* numerics: NaN reaches exactly the outputs it should; -inf in additive masks; fully masked rows
  give 0 and gradient 0; inputs scaled to 1e3 stay finite and accurate; fp16 does not overflow
  where torch's fp16 path does not;
* sizes: offsets past 2**31 elements (int64 arithmetic in the Triton kernels, int64 strides in
  the C++ engine), proved without allocating 2**31 elements (see test_offsets_past_2_31);
* determinism: bitwise-identical results run to run under torch.use_deterministic_algorithms;
* threads: concurrent calls from several Python threads give correct results; what
  bigmodel.use_backend (process-wide, not per thread) guarantees under threads.
"""
import contextlib
import math
import mmap
import pathlib
import platform
import re
import threading

import pytest
import torch
import torch.nn.functional as F

import bigmodel
from bigmodel import backend as bm_backend
from bigmodel.ops import _registry
from bigmodel.reference import ref_attention, ref_linear_relu
from tolerances import BACKWARD_FACTOR, FORWARD_FACTOR, assert_close_gemm, assert_flash_rule, magnitude, max_err

ROOT = pathlib.Path(__file__).resolve().parent.parent
needs_ops = pytest.mark.skipif(not _registry.has_ops(), reason="bigmodel._C is not built")
# The CI paths and the dtypes each one runs (the interpreter's bf16 is broken, it has no fp64 dot).
PATHS = [("cpp", torch.float32), ("cpp", torch.float64), ("cpp", torch.bfloat16),
         ("triton", torch.float32), ("triton", torch.float16)]


def _sdpa(backend, *args, **kwargs):
    """bigmodel's attention on ``backend``; skips if that path has no kernel yet."""
    with bigmodel.use_backend(backend):
        try:
            return bigmodel.scaled_dot_product_attention(*args, **kwargs)
        except NotImplementedError as err:
            pytest.skip(f"attention not implemented on {backend}: {err}")


def _grads(fn, inputs, grad):
    leaves = [t.detach().clone().requires_grad_() for t in inputs]
    out = fn(*leaves)
    return out.detach(), torch.autograd.grad(out, leaves, grad)


# =============================================================================================
# Errors: docs/errors.md is the table; these are the calls that trigger each of its rows.


def _t(*shape, **kw):
    return torch.randn(*shape, **kw)


def _mha(**kw):
    return bigmodel.nn.MultiheadAttention(8, 2, **kw)


def _mha_call(q, k, v, **kw):
    return _mha()(q, k, v, need_weights=False, **kw)


LR, SDPA = bigmodel.linear_relu, bigmodel.scaled_dot_product_attention
QKV = (_t(3, 4), _t(3, 4), _t(3, 4))

# id -> (call(monkeypatch), the argument the message must name or None, needs CUDA)
ERROR_CASES = {
    "lr-type": (lambda mp: LR(_t(3, 4), _t(5, 4), [0.0] * 5), "bias", False),
    "lr-weight-none": (lambda mp: LR(_t(3, 4), None), "weight", False),
    "lr-0d": (lambda mp: LR(torch.tensor(1.0), _t(5, 1)), "input", False),
    "lr-weight-dim": (lambda mp: LR(_t(3, 4), _t(5, 4, 1)), "weight", False),
    "lr-in-features": (lambda mp: LR(_t(3, 4), _t(5, 6)), "input", False),
    "lr-bias-shape": (lambda mp: LR(_t(3, 4), _t(5, 4), _t(1, 5)), "bias", False),
    "lr-device": (lambda mp: LR(_t(3, 4), _t(5, 4, device="meta")), "weight", False),
    "lr-dtype": (lambda mp: LR(_t(3, 4), _t(5, 4), _t(5, dtype=torch.float64)), "bias", False),
    "lr-not-float": (lambda mp: LR(torch.ones(3, 4, dtype=torch.int32), torch.ones(5, 4, dtype=torch.int32)),
                     "input", False),
    "lr-fp64-cuda": (lambda mp: LR(_t(3, 4, dtype=torch.float64, device="cuda"),
                                   _t(5, 4, dtype=torch.float64, device="cuda")), "dtype", True),
    "lr-triton-cpu": (lambda mp: (mp.setattr(bm_backend, "triton_interpreted", lambda: False),
                                  _in_backend("triton", LR, _t(3, 4), _t(5, 4))), "triton", False),
    "lr-cpp-cuda": (lambda mp: _in_backend("cpp", LR, _t(3, 4, device="cuda"), _t(5, 4, device="cuda")),
                    "cpp", True),
    "lr-not-built": (lambda mp: (mp.setattr(_registry, "_C", None), LR(_t(3, 4), _t(5, 4))), None, False),
    "flr-in-features": (lambda mp: bigmodel.nn.FusedLinearReLU(4, 3)(_t(2, 5)), "input", False),
    "flr-dtype": (lambda mp: bigmodel.nn.FusedLinearReLU(4, 3)(_t(2, 4, dtype=torch.float64)), "weight", False),
    "sdpa-type": (lambda mp: SDPA(*QKV, attn_mask=[[True] * 3] * 3), "attn_mask", False),
    "sdpa-query-none": (lambda mp: SDPA(None, _t(3, 4), _t(3, 4)), "query", False),
    "sdpa-dim": (lambda mp: SDPA(_t(3, 4), _t(4), _t(3, 4)), "key", False),
    "sdpa-embed": (lambda mp: SDPA(_t(3, 4), _t(3, 5), _t(3, 4)), "key", False),
    "sdpa-length": (lambda mp: SDPA(_t(3, 4), _t(3, 4), _t(2, 4)), "value", False),
    "sdpa-device": (lambda mp: SDPA(_t(3, 4), _t(3, 4), _t(3, 4, device="meta")), "value", False),
    "sdpa-not-float": (lambda mp: SDPA(*(torch.ones(3, 4, dtype=torch.int64),) * 3), "query", False),
    "sdpa-dtype": (lambda mp: SDPA(_t(3, 4), _t(3, 4, dtype=torch.float64), _t(3, 4)), "key", False),
    "sdpa-fp64-cuda": (lambda mp: SDPA(*(_t(3, 4, dtype=torch.float64, device="cuda"),) * 3), "dtype", True),
    "sdpa-mask-dtype": (lambda mp: SDPA(*QKV, attn_mask=torch.ones(3, 3, dtype=torch.int64)), "attn_mask", False),
    "sdpa-mask-causal": (lambda mp: SDPA(*QKV, attn_mask=torch.ones(3, 3, dtype=torch.bool), is_causal=True),
                         "is_causal", False),
    "sdpa-dropout-type": (lambda mp: SDPA(*QKV, dropout_p="0.1"), "dropout_p", False),
    "sdpa-dropout-range": (lambda mp: SDPA(*QKV, dropout_p=1.0), "dropout_p", False),
    "sdpa-scale-type": (lambda mp: SDPA(*QKV, scale="1"), "scale", False),
    "sdpa-batch": (lambda mp: SDPA(_t(2, 1, 3, 4), _t(3, 1, 3, 4), _t(3, 1, 3, 4)), "query", False),
    "sdpa-kv-heads": (lambda mp: SDPA(_t(1, 4, 3, 4), _t(1, 2, 3, 4), _t(1, 1, 3, 4)), "value", False),
    "sdpa-gqa": (lambda mp: SDPA(_t(1, 4, 3, 4), _t(1, 3, 3, 4), _t(1, 3, 3, 4), enable_gqa=True),
                 "enable_gqa", False),
    "sdpa-heads": (lambda mp: SDPA(_t(1, 4, 3, 4), _t(1, 3, 3, 4), _t(1, 3, 3, 4)), "enable_gqa", False),
    "sdpa-mask-shape": (lambda mp: SDPA(_t(3, 4), _t(5, 4), _t(5, 4), attn_mask=torch.ones(3, 4, dtype=torch.bool)),
                        "attn_mask", False),
    "sdpa-head-dim": (lambda mp: _in_backend("triton", SDPA, *(_t(1, 1, 3, 300),) * 3), "head dims", False),
    "sdpa-triton-cpu": (lambda mp: (mp.setattr(bm_backend, "triton_interpreted", lambda: False),
                                    _in_backend("triton", SDPA, *QKV)), "triton", False),
    "sdpa-triton-fp64": (lambda mp: _in_backend("triton", SDPA, *(_t(3, 4, dtype=torch.float64),) * 3),
                         "float64", False),
    "mha-heads": (lambda mp: bigmodel.nn.MultiheadAttention(8, 3), "num_heads", False),
    "mha-from-torch": (lambda mp: bigmodel.nn.MultiheadAttention.from_torch(torch.nn.Linear(2, 2)), "mha", False),
    "mha-dim": (lambda mp: _mha_call(*(_t(1, 3, 2, 8),) * 3), "query", False),
    "mha-kv-dim": (lambda mp: _mha_call(_t(3, 2, 8), _t(3, 8), _t(3, 8)), "key", False),
    "mha-embed": (lambda mp: _mha_call(*(_t(3, 2, 7),) * 3), "embed_dim", False),
    "mha-kvdim": (lambda mp: _mha_call(_t(3, 2, 8), _t(3, 2, 7), _t(3, 2, 7)), "kdim", False),
    "mha-kv-shape": (lambda mp: _mha_call(_t(3, 2, 8), _t(4, 2, 8), _t(5, 2, 8)), "key", False),
    "mha-batch": (lambda mp: _mha_call(_t(3, 2, 8), _t(4, 3, 8), _t(4, 3, 8)), "key", False),
    "mha-mask-dtype": (lambda mp: _mha_call(*(_t(3, 2, 8),) * 3, attn_mask=torch.ones(3, 3, dtype=torch.int64)),
                       "attn_mask", False),
    "mha-kpm-dim": (lambda mp: _mha_call(*(_t(3, 2, 8),) * 3, key_padding_mask=torch.zeros(3, dtype=torch.bool)),
                    "key_padding_mask", False),
    "mha-kpm-shape": (lambda mp: _mha_call(*(_t(3, 2, 8),) * 3,
                                           key_padding_mask=torch.zeros(2, 5, dtype=torch.bool)),
                      "key_padding_mask", False),
    "mha-mask-dim": (lambda mp: _mha_call(*(_t(3, 2, 8),) * 3, attn_mask=torch.zeros(1, 4, 3, 3, dtype=torch.bool)),
                     "attn_mask", False),
    "mha-mask-2d": (lambda mp: _mha_call(*(_t(3, 2, 8),) * 3, attn_mask=torch.zeros(3, 4, dtype=torch.bool)),
                    "attn_mask", False),
    "mha-mask-3d": (lambda mp: _mha_call(*(_t(3, 2, 8),) * 3, attn_mask=torch.zeros(5, 3, 3, dtype=torch.bool)),
                    "attn_mask", False),
    "mha-causal": (lambda mp: _mha_call(*(_t(3, 2, 8),) * 3, is_causal=True), "is_causal", False),
    "backend-name": (lambda mp: bigmodel.use_backend("fast").__enter__(), "backend", False),
    "backend-cublaslt": (lambda mp: _in_backend("cublaslt", LR, _t(3, 4), _t(5, 4)), "backend", False),
    "backend-env": (lambda mp: (mp.setenv("BIGMODEL_BACKEND", "fast"), LR(_t(3, 4), _t(5, 4))),
                    "BIGMODEL_BACKEND", False),
    "optimize-type": (lambda mp: bigmodel.optimize("model"), "model", False),
}
# Rows whose code does not yet do what the table says (reported to the code's owner). A strict
# xfail: when the code is fixed the test fails until the entry here is removed.
ERROR_BUGS = {
}
EXCEPTIONS = {"TypeError": TypeError, "ValueError": ValueError, "RuntimeError": RuntimeError,
              "AssertionError": AssertionError, "ExtensionNotBuilt": _registry.ExtensionNotBuilt}


def _in_backend(name, fn, *args, **kwargs):
    with bigmodel.use_backend(name):
        return fn(*args, **kwargs)


def parse_error_table(path=ROOT / "docs" / "errors.md"):
    """{id: (argument, exception name, message template)} from the tables of docs/errors.md."""
    rows = {}
    for line in path.read_text().splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) != 5 or not line.startswith("|") or cells[0] in ("id", "") or set(cells[0]) <= {"-"}:
            continue
        ident, argument, _condition, exception, message = cells
        message = re.sub(r"^`+ ?| ?`+$", "", message)
        rows[ident] = (argument, exception.split()[0], message)
    return rows


def template_regex(message):
    """A regex for a message template: literal text, with each {...} standing for any value."""
    parts = re.split(r"\{[^{}]*\}", message)
    return re.compile(".+?".join(re.escape(p) for p in parts), re.DOTALL)


ERROR_TABLE = parse_error_table()


def test_error_table_and_cases_cover_each_other():
    assert set(ERROR_TABLE) == set(ERROR_CASES), (
        f"docs/errors.md rows without a case: {sorted(set(ERROR_TABLE) - set(ERROR_CASES))}; "
        f"cases without a row: {sorted(set(ERROR_CASES) - set(ERROR_TABLE))}")
    assert set(ERROR_BUGS) <= set(ERROR_TABLE)


@pytest.mark.parametrize("ident", [
    pytest.param(i, marks=[pytest.mark.xfail(strict=True, reason=ERROR_BUGS[i])] if i in ERROR_BUGS else [])
    for i in sorted(ERROR_TABLE)])
def test_error_table(ident, monkeypatch):
    argument, exception, message = ERROR_TABLE[ident]
    call, named, needs_cuda = ERROR_CASES[ident]
    if needs_cuda and not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU (run on the H200 by bench/device_check.sh)")
    with pytest.raises(Exception) as info:
        call(monkeypatch)
    err = info.value
    assert type(err) is EXCEPTIONS[exception], f"{ident}: raised {type(err).__name__}: {err}"
    assert template_regex(message).search(str(err)), f"{ident}: message {str(err)!r} does not match {message!r}"
    if named:
        assert re.search(rf"(?<![\w.]){re.escape(named)}(?!\w)", str(err)), f"{ident}: {named!r} not named in {err}"


# =============================================================================================
# Registration: opcheck on every op, float64 gradcheck through the registered backward ops.


def _lr_samples():
    def leaf(*s, dtype=torch.float32, grad=False):
        return torch.randn(*s, dtype=dtype).requires_grad_(grad)

    return [
        (leaf(7, 5), leaf(3, 5), leaf(3)),                                   # contiguous
        (leaf(5, 7).t(), leaf(5, 3).t(), torch.randn(6)[::2]),               # non-contiguous
        (leaf(0, 5), leaf(3, 5), leaf(3)),                                   # empty batch
        (leaf(7, 0), leaf(3, 0), None),                                      # K = 0
        (leaf(7, 5, grad=True), leaf(3, 5, grad=True), leaf(3, grad=True)),  # requires_grad
        (leaf(4, 6, dtype=torch.float64, grad=True), leaf(2, 6, dtype=torch.float64, grad=True), None),
    ]


def _attn_samples():
    def t(*s, dtype=torch.float32, grad=False):
        return torch.randn(*s, dtype=dtype).requires_grad_(grad)

    mask_b = torch.rand(2, 3, 5, 6) < 0.7
    mask_f = torch.randn(1, 1, 5, 6).masked_fill(torch.rand(1, 1, 5, 6) < 0.3, float("-inf")).expand(2, 3, 5, 6)
    blhe = torch.randn(2, 5, 3, 8).transpose(1, 2)  # (B, L, H, E) storage read as (B, H, L, E)
    seed = torch.tensor([2**33 + 5, 2**33 + 7], dtype=torch.int64)
    return [
        (t(2, 3, 5, 8), t(2, 3, 6, 8), t(2, 3, 6, 8), None, 0.0, False, 0.35, None),
        (blhe, t(2, 3, 6, 8), t(2, 3, 6, 4), mask_b, 0.0, False, 0.35, None),          # strided, bool mask
        (t(2, 3, 5, 8), t(2, 3, 6, 8), t(2, 3, 6, 8), mask_f, 0.0, False, 0.35, None),  # broadcast -inf mask
        (t(1, 4, 5, 8, grad=True), t(1, 2, 6, 8, grad=True), t(1, 2, 6, 8, grad=True), None, 0.0, True, 0.2, None),
        (t(0, 3, 5, 8), t(0, 3, 6, 8), t(0, 3, 6, 8), None, 0.0, False, 0.35, None),   # empty batch
        (t(1, 2, 0, 8), t(1, 2, 6, 8), t(1, 2, 6, 8), None, 0.0, False, 0.35, None),   # L = 0
        (t(1, 2, 5, 8), t(1, 2, 0, 8), t(1, 2, 0, 8), None, 0.0, False, 0.35, None),   # S = 0: no keys
        (t(1, 2, 5, 8, dtype=torch.float64, grad=True), t(1, 2, 6, 8, dtype=torch.float64, grad=True),
         t(1, 2, 6, 8, dtype=torch.float64, grad=True), None, 0.0, False, 0.35, None),
        (t(1, 2, 5, 8), t(1, 2, 6, 8), t(1, 2, 6, 8), None, 0.25, False, 0.35, seed),  # dropout
    ]


@needs_ops
@pytest.mark.parametrize("i", range(len(_lr_samples())))
def test_opcheck_linear_relu(i):
    x, w, b = _lr_samples()[i]
    torch.library.opcheck(torch.ops.bigmodel.linear_relu.default, (x, w, b))
    y = torch.ops.bigmodel.linear_relu(x.detach(), w.detach(), b.detach() if b is not None else None)
    g = torch.randn_like(y)
    for mask in ([True, True, b is not None], [True, False, False], [False, True, False]):
        torch.library.opcheck(torch.ops.bigmodel.linear_relu_backward.default,
                              (g, y, x.detach(), w.detach(), mask))


@needs_ops
@pytest.mark.parametrize("i", range(len(_attn_samples())))
def test_opcheck_attention(i):
    args = _attn_samples()[i]
    try:
        torch.library.opcheck(torch.ops.bigmodel.attention.default, args)
    except NotImplementedError as err:
        pytest.skip(f"bigmodel::attention has no CPU kernel yet: {err}")
    q, k, v, mask, p, causal, scale, seed = (a.detach() if isinstance(a, torch.Tensor) else a for a in args)
    out, lse = torch.ops.bigmodel.attention(q, k, v, mask, p, causal, scale, seed)
    torch.library.opcheck(torch.ops.bigmodel.attention_backward.default,
                          (torch.randn_like(out), q, k, v, out, lse, mask, p, causal, scale, seed))


def _f64(*shape):
    return torch.randn(*shape, dtype=torch.float64, requires_grad=True)


@needs_ops
def test_gradcheck_linear_relu_op_and_backward_op():
    """gradcheck of the forward op runs its registered autograd formula, i.e. the backward op, against
    finite differences of the forward; then the backward op alone for every output_mask against the
    float64 vector-Jacobian product of the reference."""
    x, w, b = _f64(6, 5), _f64(4, 5), _f64(4)
    op = torch.ops.bigmodel.linear_relu
    assert torch.autograd.gradcheck(op, (x, w, b))
    assert torch.autograd.gradcheck(lambda x, w: op(x, w, None), (x.detach().t().contiguous().t()
                                                                   .requires_grad_(), w))
    y = op(x, w, b).detach()
    g = torch.randn_like(y)
    _, vjp = torch.func.vjp(ref_linear_relu, x.detach(), w.detach(), b.detach())
    want = vjp(g)
    for mask in ([True, True, True], [True, False, False], [False, True, False], [False, False, True]):
        got = torch.ops.bigmodel.linear_relu_backward(g, y, x.detach(), w.detach(), mask)
        for need, ours, ref in zip(mask, got, want):
            if need:
                torch.testing.assert_close(ours, ref, rtol=1e-12, atol=1e-12)
            else:
                assert ours.numel() == 0


@needs_ops
@pytest.mark.parametrize("case", ["plain", "gqa-causal", "bool-mask-empty-rows", "additive-inf", "Ev!=E"])
def test_gradcheck_attention_op_and_backward_op(case):
    """float64 gradcheck of bigmodel::attention; its autograd formula is bigmodel::attention_backward,
    so this checks the backward op against finite differences of the forward."""
    B, Hq, Hkv, L, S, E, Ev = 1, 2, 2, 4, 5, 3, 3
    mask, causal = None, False
    if case == "gqa-causal":
        Hq, L, S, causal = 4, 5, 4, True
    if case == "bool-mask-empty-rows":
        mask = torch.rand(B, Hq, L, S) < 0.6
        mask[:, :, 1] = False  # row 1 sees no key: output 0, gradient 0
    if case == "additive-inf":
        mask = torch.randn(B, Hq, L, S, dtype=torch.float64)
        mask[..., 0, :2] = float("-inf")
        mask[..., 2, :] = float("-inf")
    if case == "Ev!=E":
        Ev = 6
    q, k, v = _f64(B, Hq, L, E), _f64(B, Hkv, S, E), _f64(B, Hkv, S, Ev)

    def fn(q, k, v):
        return torch.ops.bigmodel.attention(q, k, v, mask, 0.0, causal, 0.5, None)[0]

    try:
        fn(q, k, v)
    except NotImplementedError as err:
        pytest.skip(f"bigmodel::attention has no CPU kernel yet: {err}")
    assert torch.autograd.gradcheck(fn, (q, k, v))
    out = fn(q, k, v)
    grads = torch.autograd.grad(out, (q, k, v), torch.randn_like(out))
    assert all(torch.isfinite(g).all() for g in grads)
    if case == "bool-mask-empty-rows":
        assert not out[:, :, 1].any() and not grads[0][:, :, 1].any()


# =============================================================================================
# Numerics.


@pytest.mark.parametrize("backend,dtype", PATHS, ids=str)
def test_linear_relu_nan_in_bias_and_rows_reaches_only_them(backend, dtype):
    m, k, n = (150, 40, 70) if backend == "cpp" else (40, 20, 36)  # rows span several blocks/tiles
    x, w, b = torch.randn(m, k).to(dtype), torch.randn(n, k).to(dtype), torch.randn(n).to(dtype)
    x[m - 3, 7] = float("nan")
    b[n - 2] = float("nan")
    with bigmodel.use_backend(backend):
        y = bigmodel.linear_relu(x, w, b)
    expect = torch.zeros(m, n, dtype=torch.bool)
    expect[m - 3] = True
    expect[:, n - 2] = True
    assert torch.equal(torch.isnan(y), expect)


def _nan_case(where, causal, L=40, S=37, E=16):
    q, k, v = torch.randn(1, 2, L, E), torch.randn(1, 2, S, E), torch.randn(1, 2, S, E)
    mask = None
    if where == "query":
        q[0, 1, 5, 3] = float("nan")
    elif where in ("key", "hidden-key"):
        k[0, 0, 20, 3] = float("nan")
    else:
        v[0, 0, 30, 3] = float("nan")
    if where == "hidden-key":  # no query may see key 20: its NaN must not leak anywhere
        mask = torch.ones(L, S, dtype=torch.bool)
        mask[:, 20] = False
    return q, k, v, mask


@pytest.mark.filterwarnings("ignore:All-NaN slice encountered:RuntimeWarning")  # numpy, in the interpreter
@pytest.mark.parametrize("backend", ["cpp", "triton"])
@pytest.mark.parametrize("where,causal", [("query", False), ("query", True), ("key", False), ("key", True),
                                          ("hidden-key", False), ("value", False), ("value", True)])
def test_attention_nan_reaches_exactly_the_rows_it_enters(backend, where, causal):
    """ref_attention's rule: a NaN in query row i reaches output row i; in key row j the rows that
    can see key j (all of them, or i >= j under causal); a hidden key reaches nothing. A NaN in
    value row j follows P V, where an exact 0 times NaN is NaN (as torch's math path): every row
    without causal. With causal, rows i >= j must be NaN; rows i < j depend on whether a kernel
    skips the key block holding j (tile-dependent), so only the first part is checked."""
    q, k, v, mask = _nan_case(where, causal)
    out = _sdpa(backend, q, k, v, attn_mask=mask, is_causal=causal)
    ref = ref_attention(q.double(), k.double(), v.double(), mask, is_causal=causal)
    ours, theirs = torch.isnan(out), torch.isnan(ref)
    if where == "value" and causal:
        assert ours[0, 0, 30:, 3].all() and not ours[0, 1].any()
        return
    assert torch.equal(ours, theirs), f"NaN rows ours {ours.any(-1).nonzero().tolist()} vs ref {theirs.any(-1).nonzero().tolist()}"
    finite = ~theirs
    assert max_err(out.double()[finite], ref[finite]) < 1e-5


@pytest.mark.parametrize("backend,dtype", PATHS, ids=str)
@pytest.mark.parametrize("kind", ["bool", "additive"])
def test_attention_fully_masked_rows_give_zero_output_and_gradient(backend, dtype, kind):
    L, S, E = 20, 19, 16
    q, k, v = (torch.randn(2, 2, n, E).to(dtype) for n in (L, L, L))
    k, v = k[:, :, :S], v[:, :, :S]
    visible = torch.rand(2, 1, L, S) < 0.6
    visible[:, :, 3] = False           # row 3 sees nothing, in every batch and head
    visible[1, :, 11] = False          # row 11 only in batch 1
    visible[:, :, 5] = True            # row 5 sees every key
    if kind == "bool":
        mask = visible
    else:  # -inf where hidden, finite noise elsewhere
        mask = torch.randn(2, 1, L, S).masked_fill(~visible, float("-inf")).to(dtype)
    grad = torch.randn(2, 2, L, E).to(dtype)
    with bigmodel.use_backend(backend):
        try:
            out, (dq, dk, dv) = _grads(lambda q, k, v: bigmodel.scaled_dot_product_attention(
                q, k, v, attn_mask=mask), (q, k, v), grad)
        except NotImplementedError as err:
            pytest.skip(f"attention not implemented on {backend}: {err}")
    for t in (out, dq, dk, dv):
        assert torch.isfinite(t).all()
    assert not out[:, :, 3].any() and not out[1, :, 11].any()
    assert not dq[:, :, 3].any() and not dq[1, :, 11].any()
    m64 = mask if kind == "bool" else mask.double()
    ref, ref_g = _grads(lambda q, k, v: ref_attention(q, k, v, m64), [t.double() for t in (q, k, v)], grad.double())
    same, same_g = _grads(lambda q, k, v: ref_attention(q, k, v, mask), (q, k, v), grad)
    assert_flash_rule(out, same, ref, dtype, FORWARD_FACTOR, "out")
    for name, g, r, s in zip("qkv", (dq, dk, dv), ref_g, same_g):
        assert_flash_rule(g, s, r, dtype, BACKWARD_FACTOR, f"d{name}", scale=math.sqrt(L) * magnitude(r))


@pytest.mark.parametrize("backend,dtype", PATHS, ids=str)
def test_attention_huge_finite_mask_is_not_treated_as_hidden(backend, dtype):
    """-1e30 (fp16: -6e4) is a finite additive mask value: a row masked by it everywhere is the
    softmax of equal scores (the mean of V), not an empty row. Only -inf or False hides a key."""
    L, S, E = 20, 19, 16
    q, k, v = (torch.randn(1, 2, n, E).to(dtype) for n in (L, S, S))
    big = -6e4 if dtype == torch.float16 else -1e30
    mask = torch.randn(1, 1, L, S)
    mask[..., 3, :] = big
    mask[..., 4, :5] = big
    mask = mask.to(dtype)
    out = _sdpa(backend, q, k, v, attn_mask=mask)
    ref = ref_attention(q.double(), k.double(), v.double(), mask.double())
    assert out[..., 3, :].abs().sum() > 0
    assert_flash_rule(out, ref_attention(q, k, v, mask), ref, dtype, FORWARD_FACTOR, "out")


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # numpy, in the interpreter
@pytest.mark.parametrize("backend,dtype", PATHS, ids=str)
def test_linear_relu_infinities_match_the_reference(backend, dtype):
    """inf in an input row gives inf (or NaN where inf * 0 or inf - inf) exactly where float64 does."""
    x, w = torch.randn(30, 16).to(dtype), torch.randn(12, 16).to(dtype)
    x[4, 2], x[7, 1], w[5, 0] = float("inf"), float("-inf"), float("inf")
    w[9, 2] = 0.0  # inf * 0 = NaN in row 4, column 9
    with bigmodel.use_backend(backend):
        y = bigmodel.linear_relu(x, w)
    ref = ref_linear_relu(x.double(), w.double())
    assert torch.equal(y.isnan(), ref.isnan()) and torch.equal(y.isinf(), ref.isinf())
    assert y[4, 9].isnan()


@pytest.mark.parametrize("backend,dtype", [p for p in PATHS if p[1] != torch.float16], ids=str)
def test_attention_inputs_scaled_to_1e3_stay_finite_and_accurate(backend, dtype):
    """Scores of order 1e6: the softmax is nearly one-hot and exp must not overflow anywhere
    (fp32/bf16/fp64 range). fp16 cannot hold such scores: see the fp16 overflow test instead."""
    L, S, E = 17, 23, 16
    q, k, v = ((1e3 * torch.randn(1, 2, n, E)).to(dtype) for n in (L, S, S))
    out = _sdpa(backend, q, k, v, is_causal=True)
    assert torch.isfinite(out).all()
    ref = ref_attention(q.double(), k.double(), v.double(), is_causal=True)
    same = ref_attention(q, k, v, is_causal=True)
    assert_flash_rule(out, same, ref, dtype, FORWARD_FACTOR, "out", scale=1e3)


@pytest.mark.parametrize("backend,dtype", PATHS, ids=str)
def test_linear_relu_inputs_scaled_to_1e3(backend, dtype):
    k = 64
    x, w = (1e3 * torch.randn(9, k)).to(dtype), (1e3 * torch.randn(7, k)).to(dtype)
    if dtype == torch.float16:  # 1e6 x sqrt(k) does not fit fp16: scale so that it just does
        x, w = x / 1e3 * 30, w / 1e3 * 30
    b = torch.randn(7).to(dtype)
    with bigmodel.use_backend(backend):
        y = bigmodel.linear_relu(x, w, b)
    ref = ref_linear_relu(x.double(), w.double(), b.double())
    assert torch.isfinite(y).all()
    mag = ref.abs().max().item()
    assert_close_gemm(y / mag, ref / mag, dtype, k, f"{backend} scaled")


@pytest.mark.parametrize("backend", ["cpp", "triton"])
def test_fp16_linear_relu_does_not_overflow_where_torch_does_not(backend):
    """Partial sums past 65504 whose total fits fp16: torch accumulates fp16 GEMMs in fp32, so
    must we (an fp16 accumulator would give inf)."""
    k = 256
    x = torch.full((4, k), 600.0, dtype=torch.float16)
    x[:, k // 2:] = -600.0      # first half sums to 76800 > 65504, the whole row to 0
    x[:, -1] = -500.0           # ... to 100
    w = torch.ones(3, k, dtype=torch.float16)
    theirs = F.relu(F.linear(x, w))
    assert torch.isfinite(theirs).all()
    with bigmodel.use_backend(backend):
        y = bigmodel.linear_relu(x, w)
    assert torch.isfinite(y).all()
    torch.testing.assert_close(y, theirs)


@pytest.mark.parametrize("backend", ["cpp", "triton"])
def test_fp16_attention_does_not_overflow_where_torch_does_not(backend):
    """Raw q.k up to ~1e5 (> 65504) but scaled scores of ~1e4 (which torch's fp16 SDPA handles):
    the scores must not pass through fp16 before scaling."""
    dtype = torch.float16
    E = 64
    q = torch.full((1, 1, 8, E), 40.0).to(dtype)
    k = torch.full((1, 1, 9, E), 40.0).to(dtype)
    k[..., 1::2, :] = -40.0
    v = torch.randn(1, 1, 9, E).to(dtype)
    theirs = F.scaled_dot_product_attention(q, k, v)
    assert torch.isfinite(theirs).all()
    out = _sdpa(backend, q, k, v)
    assert torch.isfinite(out).all()
    ref = ref_attention(q.double(), k.double(), v.double())
    assert_flash_rule(out, theirs, ref, dtype, FORWARD_FACTOR, "out", scale=4.0)


# =============================================================================================
# Sizes: offsets past 2**31 elements.
#
# What is proved here: every pointer offset a kernel forms from a tensor's strides (row, column,
# batch, head and mask offsets, in the forward and backward kernels of both ops) is computed in
# int64, for each tensor the kernels read or write through strides. Offsets into the launchers'
# own contiguous buffers (attention's lse and delta, (b * H + h) * L + i) start from an int64 b;
# reaching 2**31 there needs B * H * L > 2**31 programs' worth of rows, which the interpreter
# cannot run: that part rests on reading kernels/attention.py (b is cast to int64 before use).
# The C++ engine indexes through at::Tensor's int64 strides; the same views go through it.


def _far_apart(values, dim, gap, base=2**31):
    """A view equal to ``values`` whose ``dim`` has stride ``gap`` (the other dims packed), over a
    storage that spans ``base + extent`` elements but costs only the pages the view touches.

    The storage is an anonymous MAP_NORESERVE mapping: untouched pages are never allocated (reads
    would map the kernel's shared zero page), so a 16 GiB span costs a few KiB of memory. The view
    starts at element ``base`` = 2**31, so where an offset in [2**31, 2**32) wrapped to int32 it
    would land, 2**32 elements earlier, inside the mapping too: on a zero, not on a segfault. A
    kernel computing offsets in int32 then returns wrong values, which the test sees.
    """
    shape = list(values.shape)
    inner = [s for i, s in enumerate(shape) if i != dim]
    packed, acc = [], 1
    for s in reversed(inner):
        packed.insert(0, acc)
        acc *= s
    assert acc <= gap, "the packed dims must fit between two entries of the far dim"
    strides = packed[:dim] + [gap] + packed[dim:]
    extent = 1 + sum((n - 1) * s for n, s in zip(shape, strides))
    elt = values.element_size()
    flags = mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | _MAP_NORESERVE
    try:
        region = mmap.mmap(-1, (base + extent) * elt, flags=flags)
    except (OSError, ValueError, OverflowError) as err:
        pytest.skip(f"cannot reserve {(base + extent) * elt / 2**30:.0f} GiB of address space: {err}")
    storage = torch.frombuffer(region, dtype=values.dtype)
    view = storage[base:].as_strided(shape, strides)
    view.copy_(values)
    return view


# Python < 3.12 lacks the constant; 0x4000 is MAP_NORESERVE on x86-64 and arm64 Linux.
_MAP_NORESERVE = getattr(mmap, "MAP_NORESERVE", 0x4000 if platform.system() == "Linux"
                         and platform.machine() in ("x86_64", "aarch64") else 0)
GAP = 2**30 + 4096  # entry 2 of the far dim sits at 2**31 + 8192: past int32, inside the mapping


def _rss_mib():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * mmap.PAGESIZE / 2**20


@pytest.fixture
def small_footprint():
    """The far-apart views must cost pages, not GiB: resident memory grows by < 512 MiB."""
    if platform.system() != "Linux":
        pytest.skip("needs Linux (anonymous MAP_NORESERVE mappings, /proc/self/statm)")
    before = _rss_mib()
    yield
    assert _rss_mib() - before < 512, f"resident memory grew by {_rss_mib() - before:.0f} MiB"


def test_interpreter_reproduces_int32_wraparound(small_footprint):
    """The control for the tests below: a kernel that multiplies an int32 row index by an int32
    stride reads the wrong element (it wraps), so a Triton kernel without int64 offsets would fail
    them rather than pass by luck."""
    triton = pytest.importorskip("triton")
    tl = pytest.importorskip("triton.language")
    if not bm_backend.triton_interpreted():
        pytest.skip("runs under the Triton interpreter")

    @triton.jit
    def copy_rows_int32(x_ptr, y_ptr, stride, K, BLOCK: tl.constexpr):
        r = tl.program_id(0)
        offs = tl.arange(0, BLOCK)
        v = tl.load(x_ptr + r * stride + offs, mask=offs < K)  # r * stride in int32: wraps
        tl.store(y_ptr + r * K + offs, v, mask=offs < K)

    rows = torch.randn(3, 8)
    x = _far_apart(rows, 0, GAP)
    y = torch.empty(3, 8)
    copy_rows_int32[(3,)](x, y, GAP, 8, BLOCK=8)
    assert torch.equal(y[:2], rows[:2])
    assert not torch.equal(y[2], rows[2]) and not y[2].any()  # read 2**32 elements too early: zeros


@pytest.mark.parametrize("backend", ["cpp", "triton"])
@pytest.mark.parametrize("far", ["x-rows", "x-cols", "w-rows"])
def test_linear_relu_offsets_past_2_31(backend, far, small_footprint):
    """linear_relu forward and backward reading rows (or columns) 2**31 elements apart."""
    torch.manual_seed(0)
    m, k, n = (3, 40, 5) if far != "x-cols" else (6, 3, 5)
    x0, w0, b0 = torch.randn(m, k), torch.randn(n, k), torch.randn(n)
    g0 = torch.randn(m, n)
    x = _far_apart(x0, 0, GAP) if far == "x-rows" else _far_apart(x0, 1, GAP) if far == "x-cols" else x0
    w = _far_apart(torch.randn(3, k), 0, GAP) if far == "w-rows" else w0
    if far == "w-rows":
        n, w0, b0, g0 = 3, w.clone(), b0[:3], g0[:, :3]
    ref = ref_linear_relu(x0.double(), w0.double(), b0.double())
    with bigmodel.use_backend(backend):
        y = bigmodel.linear_relu(x, w, b0)
    assert_close_gemm(y, ref, torch.float32, k, "forward")
    # The backward launchers straight, with grad and the saved output far apart too.
    gz = g0.double() * (ref > 0)
    want = (gz @ w0.double(), gz.t() @ x0.double(), gz.sum(0))
    g = _far_apart(g0, 0, GAP) if m >= 3 else g0
    yv = _far_apart(y, 0, GAP) if m >= 3 else y
    if backend == "triton":
        from bigmodel.kernels import linear_relu as kernels
        got = kernels.linear_relu_bwd(g, yv, x, w, [True, True, True])
    else:
        got = torch.ops.bigmodel.linear_relu_backward(g, yv, x, w, [True, True, True])
    for name, ours, r in zip(("dx", "dw", "db"), got, want):
        assert_close_gemm(ours, r, torch.float32, max(m, n), name)


@pytest.mark.parametrize("backend", ["cpp", "triton"])
@pytest.mark.parametrize("far", ["q-batch", "kv-rows", "q-rows-mask"])
def test_attention_offsets_past_2_31(backend, far, small_footprint):
    """Attention forward and backward with batch entries, or key/value rows, 2**31 elements apart
    (and a bool mask whose rows are); the Triton launchers are called straight for the backward
    so grad_out and the saved output can be far apart too."""
    torch.manual_seed(0)
    B, H, L, S, E = 3, 2, 5, 6, 16
    q0, k0, v0 = torch.randn(B, H, L, E), torch.randn(B, H, S, E), torch.randn(B, H, S, E)
    mask0 = None
    q, k, v, mask = q0, k0, v0, None
    if far == "q-batch":
        q = _far_apart(q0, 0, GAP)
    if far == "kv-rows":
        k0, v0 = torch.randn(1, 1, 3, E), torch.randn(1, 1, 3, E)
        q0, B, H, S = q0[:1, :1], 1, 1, 3
        q, k, v = q0, _far_apart(k0, 2, GAP), _far_apart(v0, 2, GAP)
    if far == "q-rows-mask":
        mask0 = torch.rand(B, H, L, S) < 0.7
        mask0[..., 0] = True
        q = _far_apart(q0, 2, GAP)
        mask = _far_apart(mask0, 2, GAP)
    scale = E ** -0.5
    ref = ref_attention(q0.double(), k0.double(), v0.double(), mask0)
    if backend == "triton":
        from bigmodel.kernels import attention as kernels
        out, lse = kernels.attention_fwd(q, k, v, mask, 0.0, False, scale, None)
    else:
        try:
            out, lse = torch.ops.bigmodel.attention(q, k, v, mask, 0.0, False, scale, None)
        except NotImplementedError as err:
            pytest.skip(f"bigmodel::attention has no CPU kernel yet: {err}")
    assert max_err(out, ref) < 1e-5
    g0 = torch.randn(out.shape)
    g = _far_apart(g0, 0, GAP) if out.shape[0] >= 3 else g0
    o = _far_apart(out, 0, GAP) if out.shape[0] >= 3 else out
    if backend == "triton":
        got = kernels.attention_bwd(g, q, k, v, o, lse, mask, 0.0, False, scale, None)
    else:
        got = torch.ops.bigmodel.attention_backward(g, q, k, v, o, lse, mask, 0.0, False, scale, None)
    _, want = _grads(lambda q, k, v: ref_attention(q, k, v, mask0), [t.double() for t in (q0, k0, v0)], g0.double())
    for name, ours, r in zip(("dq", "dk", "dv"), got, want):
        assert max_err(ours, r) < 1e-4 * max(1.0, r.abs().max().item()), name


# =============================================================================================
# Determinism.


@contextlib.contextmanager
def _deterministic():
    old, old_warn = torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(old, warn_only=old_warn)


@pytest.mark.parametrize("backend,dtype", [("cpp", torch.float32), ("cpp", torch.bfloat16),
                                           ("triton", torch.float32), ("triton", torch.float16)], ids=str)
def test_bitwise_deterministic_run_to_run(backend, dtype):
    big = backend == "cpp"
    m, k, n = (700, 130, 90) if big else (40, 36, 33)  # C++: several row blocks, all threads
    x, w, b = torch.randn(m, k).to(dtype), torch.randn(n, k).to(dtype), torch.randn(n).to(dtype)
    L, S, E = (150, 130, 64) if big else (33, 20, 16)
    q, kk, v = torch.randn(2, 4, L, E).to(dtype), torch.randn(2, 2, S, E).to(dtype), torch.randn(2, 2, S, E).to(dtype)
    mask = torch.rand(2, 1, L, S) < 0.8
    gy, go = torch.randn(m, n).to(dtype), torch.randn(2, 4, L, E).to(dtype)

    def run():
        with bigmodel.use_backend(backend):
            lr = _grads(bigmodel.linear_relu, (x, w, b), gy)
            try:
                at = _grads(lambda q, k, v: bigmodel.scaled_dot_product_attention(
                    q, k, v, attn_mask=mask, enable_gqa=True), (q, kk, v), go)
            except NotImplementedError:
                at = None
        return lr, at

    with _deterministic():
        first, second = run(), run()
    for a, b2 in zip(first, second):
        if a is None:
            continue
        (oa, ga), (ob, gb) = a, b2
        assert torch.equal(oa, ob) and all(torch.equal(u, t) for u, t in zip(ga, gb))


# =============================================================================================
# Threads.


def _worker(tid, calls, errors, backends=("cpp",)):
    gen = torch.Generator().manual_seed(1000 + tid)
    try:
        for i in range(calls):
            name = backends[i % len(backends)]
            m, k, n = (int(s) for s in torch.randint(1, 90, (3,), generator=gen))
            x, w, b = (torch.randn(m, k, generator=gen, dtype=torch.float64),
                       torch.randn(n, k, generator=gen, dtype=torch.float64),
                       torch.randn(n, generator=gen, dtype=torch.float64))
            L, S = (int(s) for s in torch.randint(1, 40, (2,), generator=gen))
            q, kk, v = (torch.randn(1, 2, n_, 8, generator=gen, dtype=torch.float64) for n_ in (L, S, S))
            with bigmodel.use_backend(name):
                y = bigmodel.linear_relu(x, w, b)
                try:
                    o = bigmodel.scaled_dot_product_attention(q, kk, v, is_causal=bool(i % 2))
                except NotImplementedError:
                    o = None
            torch.testing.assert_close(y, ref_linear_relu(x, w, b), rtol=1e-10, atol=1e-10)
            if o is not None:
                torch.testing.assert_close(o, ref_attention(q, kk, v, is_causal=bool(i % 2)), rtol=1e-6, atol=1e-6)
    except BaseException as err:  # noqa: BLE001 - reported by the main thread
        errors.append((tid, repr(err)))


def _run_threads(n, target, **kwargs):
    errors = []
    threads = [threading.Thread(target=target, args=(t, 20, errors), kwargs=kwargs) for t in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    assert not any(t.is_alive() for t in threads), "a thread hung"
    assert not errors, errors


def test_concurrent_calls_from_threads_are_correct():
    """4 threads x 20 calls of both ops (C++ engine, shapes differ per call) while each also uses
    at::parallel_for inside: every result matches the float64 reference."""
    _run_threads(4, _worker)


def test_use_backend_across_threads_stays_correct_and_balanced():
    """use_backend is process-wide, like torch.backends flags (documented in docs/errors.md): a
    block open in one thread changes what calls in other threads resolve to. The guarantees:
    every backend computes the same function (so concurrent blocks never give wrong results), and
    blocks pop in balance, so once all threads have left theirs the setting is what it was.
    (Triton's interpreter is not thread-safe, so only 'cpp' and 'reference' take part here.)"""
    before = bm_backend.current()
    _run_threads(4, _worker, backends=("cpp", "reference"))
    assert bm_backend.current() == before and not bm_backend._stack


def test_use_backend_is_process_wide():
    seen = []
    entered, release = threading.Event(), threading.Event()

    def hold():
        with bigmodel.use_backend("reference"):
            entered.set()
            release.wait(30)

    t = threading.Thread(target=hold)
    t.start()
    try:
        assert entered.wait(30)
        seen.append(bm_backend.current())  # another thread's block is in force here too
    finally:
        release.set()
        t.join(30)
    assert seen == ["reference"]
    assert not bm_backend._stack


# =============================================================================================
# On the GPU (bench/device_check.sh): the same properties with the compiled kernels, and tensors
# that really pass 2**31 elements (the H200 has the memory; CI cannot allocate them).


@pytest.mark.cuda
def test_cuda_linear_relu_tensor_past_2_31_elements():
    """x (M, K) with M * K > 2**31: row offsets m * K of the last rows pass int32."""
    k = n = 512
    m = 2**31 // k + 3
    x = torch.empty(m, k, device="cuda", dtype=torch.float16).normal_().mul_(k ** -0.25)
    w = (torch.randn(n, k, device="cuda") * k ** -0.25).half().requires_grad_()
    b = torch.randn(n, device="cuda").half().requires_grad_()
    x.requires_grad_()
    y = bigmodel.linear_relu(x, w, b)
    tail = slice(m - 5, m)
    ref = ref_linear_relu(x[tail].detach().double(), w.detach().double(), b.detach().double())
    assert_close_gemm(y[tail], ref, torch.float16, k, "last rows")
    grad = torch.zeros_like(y)
    grad[tail] = torch.randn(5, n, device="cuda").half()
    dx, dw, db = torch.autograd.grad(y, (x, w, b), grad)
    gz = grad[tail].double() * (y[tail].detach().double() > 0)
    assert_close_gemm(dx[tail], gz @ w.detach().double(), torch.float16, n, "dx last rows")
    assert not dx[: m - 5].any()
    assert_close_gemm(dw, gz.t() @ x[tail].detach().double(), torch.float16, 5, "dw")
    assert_close_gemm(db, gz.sum(0), torch.float16, 5, "db")


@pytest.mark.cuda
def test_cuda_attention_tensor_past_2_31_elements():
    """query (B, H, L, E) with B * H * L * E > 2**31 (key/value broadcast over the batch):
    batch offsets b * stride of the last entries pass int32, forward and backward."""
    H, L, S, E = 16, 16, 24, 256
    B = 2**31 // (H * L * E) + 2
    q = torch.empty(B, H, L, E, device="cuda", dtype=torch.float16).normal_().requires_grad_()
    k = torch.randn(1, H, S, E, device="cuda").half().requires_grad_()
    v = torch.randn(1, H, S, E, device="cuda").half().requires_grad_()
    out = bigmodel.scaled_dot_product_attention(q, k.expand(B, -1, -1, -1), v.expand(B, -1, -1, -1))
    tail = slice(B - 2, B)
    ref = ref_attention(q[tail].detach().double(), k.detach().double(), v.detach().double())
    same = ref_attention(q[tail].detach(), k.detach(), v.detach())
    assert_flash_rule(out[tail], same, ref, torch.float16, FORWARD_FACTOR, "last batch entries")
    grad = torch.zeros_like(out)
    grad[tail] = torch.randn(2, H, L, E, device="cuda").half()
    dq, dk, dv = torch.autograd.grad(out, (q, k, v), grad)
    assert not dq[: B - 2].any()
    _, want = _grads(lambda q, k, v: ref_attention(q, k, v), [t.detach().double() for t in (q[tail], k, v)],
                     grad[tail].double())
    _, same_g = _grads(lambda q, k, v: ref_attention(q, k, v), [t.detach() for t in (q[tail], k, v)], grad[tail])
    for name, g, r, s in zip(("dq", "dk", "dv"), (dq[tail], dk, dv), want, same_g):
        assert_flash_rule(g, s, r, torch.float16, BACKWARD_FACTOR, name, scale=magnitude(r) * 5)


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
def test_cuda_bitwise_deterministic_and_nan_rows(dtype):
    x, w, b = (torch.randn(*s, device="cuda").to(dtype) for s in ((1000, 300), (200, 300), (200,)))
    q = torch.randn(2, 8, 300, 64, device="cuda").to(dtype)
    kv = torch.randn(2, 2, 280, 64, device="cuda").to(dtype)
    mask = torch.rand(2, 1, 300, 280, device="cuda") < 0.8
    gy, go = torch.randn(1000, 200, device="cuda").to(dtype), torch.randn(2, 8, 300, 64, device="cuda").to(dtype)

    def run():
        lr = _grads(bigmodel.linear_relu, (x, w, b), gy)
        at = _grads(lambda q, k, v: bigmodel.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True),
                    (q, kv, kv), go)
        return lr, at

    with _deterministic():
        first, second = run(), run()
    for (oa, ga), (ob, gb) in zip(first, second):
        assert torch.equal(oa, ob) and all(torch.equal(u, t) for u, t in zip(ga, gb))
    qn = q.clone()
    qn[1, 3, 77, 5] = float("nan")
    out = bigmodel.scaled_dot_product_attention(qn, kv, kv, attn_mask=mask, enable_gqa=True)
    rows = torch.isnan(out).any(-1)
    assert rows[1, 3, 77] and rows.sum() == 1
