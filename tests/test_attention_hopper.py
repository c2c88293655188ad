"""The Hopper variants of the attention kernels (tensor descriptors / TMA, and the
warp-specialised forward) against float64, through the registered op, under the interpreter.

Triton's interpreter runs ``tl.make_tensor_descriptor`` loads and stores (edge tiles included);
warp specialisation is a compiler transform it ignores, so the warp-specialised forward is
checked here for its own loop structure (one masked loop) and on the GPU for the transform
(the cuda-marked test, run by bench/device_check.sh). BIGMODEL_TRITON_VARIANT picks the variant
and each test checks the autotuners really ran it. Accuracy: the house rule (tests/tolerances.py).
"""
import math

import pytest
import torch

from bigmodel.reference import ref_attention
from peers import assert_attention_matches
from triton_on_cpu import fixtures, use_variant

pytestmark = pytest.mark.filterwarnings("ignore:.*[Oo]verrid.*:UserWarning")

VARIANTS = ("tma", "tma_ws")


kernels, triton_on_cpu = fixtures("attention")


def _ran(kernels, variant, dtype, mask=None):
    """The configs the three autotuners last ran are of ``variant`` (the warp-specialised forward
    takes 16-bit inputs without a mask only; other launches run its plain-TMA configs)."""
    for k in (kernels._attention_fwd_kernel, kernels._attention_bwd_dkdv_kernel, kernels._attention_bwd_dq_kernel):
        flags = k.best_config.kwargs
        assert flags["TMA"], (k.fn.__name__, flags)
    ws = variant == "tma_ws" and dtype.itemsize == 2 and mask is None
    assert kernels._attention_fwd_kernel.best_config.kwargs["WS"] == ws


def _inputs(B, H, HKV, L, S, E, EV, dtype, device="cpu"):
    q = torch.randn(B, H, L, E, dtype=dtype, device=device)
    k = torch.randn(B, HKV, S, E, dtype=dtype, device=device)
    v = torch.randn(B, HKV, S, EV, dtype=dtype, device=device)
    return q, k, v


def _op(q, k, v, grad, mask=None, p=0.0, causal=False, seed=None):
    """Output and (dq, dk, dv) of bigmodel::attention and its registered backward."""
    q, k, v = (t.detach().requires_grad_() for t in (q, k, v))
    out, _ = torch.ops.bigmodel.attention(q, k, v, mask, p, causal, 1 / math.sqrt(q.shape[-1]), seed)
    out.backward(grad)
    return out.detach(), q.grad, k.grad, v.grad


def _check(ours, q, k, v, grad, dtype, what, mask=None, causal=False, keep=None, p=0.0):
    """The house rule (tests/peers.py) for the op's output and gradients ``ours``."""
    assert ours[0].dtype == dtype
    assert_attention_matches(ours[0], q, k, v, grad, ours[1:], what, rounds_operands=True, attn_mask=mask,
                             is_causal=causal, scale=1 / math.sqrt(q.shape[-1]), enable_gqa=True, dropout_p=p,
                             dropout_keep=keep)


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("dtype", (torch.float32, torch.float16))
@pytest.mark.parametrize("causal", (False, True))
def test_matches_float64(triton_on_cpu, kernels, monkeypatch, variant, dtype, causal):
    """GQA, odd lengths (edge tiles past L and S), padded head dims (24 -> 32, 40 -> 64)."""
    use_variant(monkeypatch, variant)
    q, k, v = _inputs(2, 4, 2, 37, 45, 24, 40, dtype)
    grad = torch.randn(2, 4, 37, 40, dtype=dtype)
    ours = _op(q, k, v, grad, causal=causal)
    _ran(kernels, variant, dtype)
    _check(ours, q, k, v, grad, dtype, f"{variant} causal={causal}", causal=causal)


@pytest.mark.parametrize("variant", VARIANTS)
def test_masks_and_dropout(triton_on_cpu, kernels, monkeypatch, variant):
    """Bool and additive masks, and dropout drawn from the same Philox counters as the plain
    kernels: the keep mask dropout_keep_mask materialises, and the plain kernels' results."""
    dtype = torch.float16
    q, k, v = _inputs(1, 2, 1, 33, 40, 16, 16, dtype)
    grad = torch.randn(1, 2, 33, 16, dtype=dtype)
    bool_mask = torch.rand(1, 2, 33, 40) > 0.3
    bool_mask[0, 1, 5] = False  # a fully masked row: output 0, gradient 0
    add_mask = torch.randn(1, 2, 33, 40, dtype=dtype)
    seed = torch.tensor([2**40 + 11, 2**33 + 3])
    use_variant(monkeypatch, variant)
    ours_bool = _op(q, k, v, grad, mask=bool_mask)
    _ran(kernels, variant, dtype, bool_mask)
    ours_add = _op(q, k, v, grad, mask=add_mask)
    ours_drop = _op(q, k, v, grad, p=0.25, seed=seed, causal=True)
    _ran(kernels, variant, dtype)
    _check(ours_bool, q, k, v, grad, dtype, "bool mask", mask=bool_mask)
    zeros = torch.zeros(16, dtype=dtype)
    assert torch.equal(ours_bool[0][0, 1, 5], zeros) and torch.equal(ours_bool[1][0, 1, 5], zeros)
    _check(ours_add, q, k, v, grad, dtype, "additive mask", mask=add_mask)
    keep = kernels.dropout_keep_mask(2, 33, 40, 0.25, seed, q.device).view(1, 2, 33, 40)
    _check(ours_drop, q, k, v, grad, dtype, "dropout", causal=True, keep=keep, p=0.25)
    monkeypatch.setenv("BIGMODEL_TRITON_VARIANT", "plain")
    plain = _op(q, k, v, grad, p=0.25, seed=seed, causal=True)
    for a, b in zip(ours_drop, plain):  # the same keep mask: equal up to the order of additions
        torch.testing.assert_close(a, b, rtol=2e-3, atol=2e-3)


@pytest.mark.parametrize("variant", VARIANTS)
def test_nan_reaches_exactly_what_it_touches(triton_on_cpu, kernels, monkeypatch, variant):
    """A NaN query row poisons its own output row only; a NaN key, causal, the rows that see it;
    the NaN pattern is the plain kernels' (and the reference's)."""
    q, k, v = _inputs(1, 2, 2, 20, 20, 16, 16, torch.float16)
    q[0, 0, 3, 5] = float("nan")
    k[0, 1, 12, 2] = float("nan")
    grad = torch.randn(1, 2, 20, 16, dtype=torch.float16)
    use_variant(monkeypatch, variant)
    ours = _op(q, k, v, grad, causal=True)
    _ran(kernels, variant, torch.float16)
    monkeypatch.setenv("BIGMODEL_TRITON_VARIANT", "plain")
    plain = _op(q, k, v, grad, causal=True)
    ref = ref_attention(q.double(), k.double(), v.double(), is_causal=True)
    assert torch.equal(torch.isnan(ours[0]), torch.isnan(ref))
    assert torch.isnan(ours[0][0, 0, 3]).all() and not torch.isnan(ours[0][0, 0, :3]).any()
    assert torch.isnan(ours[0][0, 1, 12:]).all() and not torch.isnan(ours[0][0, 1, :12]).any()
    for a, b in zip(ours, plain):
        assert torch.equal(torch.isnan(a), torch.isnan(b))


@pytest.mark.parametrize("variant", VARIANTS)
def test_deterministic(triton_on_cpu, kernels, monkeypatch, variant):
    """Every output element has one writer (no atomics): bitwise the same on a rerun, GQA included."""
    use_variant(monkeypatch, variant)
    q, k, v = _inputs(1, 4, 1, 24, 30, 16, 16, torch.float16)
    grad = torch.randn(1, 4, 24, 16, dtype=torch.float16)
    first, second = _op(q, k, v, grad, causal=True), _op(q, k, v, grad, causal=True)
    _ran(kernels, variant, torch.float16)
    for a, b in zip(first, second):
        assert torch.equal(a, b)


def test_broadcast_and_strided_inputs(triton_on_cpu, kernels, monkeypatch):
    """Descriptors over views: keys/values broadcast over heads (stride 0, as SDPA's layout
    mapping hands them over) and a (B, L, H, E) query read in place through its transpose."""
    use_variant(monkeypatch, "tma")
    dtype = torch.float16
    q = torch.randn(2, 21, 3, 16, dtype=dtype).transpose(1, 2)
    k, v = (torch.randn(2, 1, 19, 16, dtype=dtype).expand(2, 3, 19, 16) for _ in range(2))
    grad = torch.randn(2, 3, 21, 16, dtype=dtype)
    ours = _op(q, k, v, grad, causal=True)
    _ran(kernels, "tma", dtype)
    _check(ours, q, k, v, grad, dtype, "broadcast", causal=True)


def test_forced_variant_needs_tma_aligned_tensors(triton_on_cpu, monkeypatch):
    """Head dim 7 in fp32: 28-byte rows, which TMA cannot address; 'auto' falls back silently
    (tests/test_attention.py), a forced variant says why it cannot run."""
    monkeypatch.setenv("BIGMODEL_TRITON_VARIANT", "tma")
    q, k, v = _inputs(1, 1, 1, 8, 8, 7, 7, torch.float32)
    with pytest.raises(ValueError, match="not TMA-aligned.*strides"):
        torch.ops.bigmodel.attention(q, k, v, None, 0.0, False, 1.0, None)
    monkeypatch.setenv("BIGMODEL_TRITON_VARIANT", "fastest")
    with pytest.raises(ValueError, match="BIGMODEL_TRITON_VARIANT must be one of"):
        torch.ops.bigmodel.attention(q, k, v, None, 0.0, False, 1.0, None)


@pytest.mark.cuda
@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("dtype", (torch.bfloat16, torch.float16))
def test_cuda_variants_match_float64(monkeypatch, kernels, variant, dtype):
    """On the H200 (bench/device_check.sh): the compiled variants, warp specialisation included,
    at head dims 64 and 128, causal and not, GQA and dropout."""
    use_variant(monkeypatch, variant)
    for d, causal, p in ((64, True, 0.0), (128, False, 0.0), (128, True, 0.1)):
        q, k, v = _inputs(2, 4, 2, 1000, 1000, d, d, dtype, "cuda")
        grad = torch.randn(2, 4, 1000, d, dtype=dtype, device="cuda")
        seed = torch.tensor([2**40 + 7, 2**33 + 1]) if p else None
        q_, k_, v_ = (t.detach().requires_grad_() for t in (q, k, v))
        out, _ = torch.ops.bigmodel.attention(q_, k_, v_, None, p, causal, 1 / math.sqrt(d), seed)
        out.backward(grad)
        _ran(kernels, variant, dtype)
        keep = kernels.dropout_keep_mask(8, 1000, 1000, p, seed, q.device).view(2, 4, 1000, 1000) if p else None
        _check((out.detach(), q_.grad, k_.grad, v_.grad), q, k, v, grad, dtype, f"{variant} d={d}", causal=causal,
               keep=keep, p=p)
