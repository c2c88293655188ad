"""Property-based fuzzing of bigmodel.scaled_dot_product_attention against the float64 reference
(bigmodel.reference.ref_attention), forward and backward, on every path CI runs: the C++ engine
('cpp') and the Triton kernels under the interpreter ('triton').

Random leading dims, heads and GQA ratios, lengths (0 and 1 included), head dims (value's may
differ from query's), layouts (contiguous, (B, L, H, E) transposed, sliced, expanded), masks (none,
bool, additive with -inf entries, broadcast shapes, fully masked rows), causal, custom scales.
Errors follow the house rule (tests/tolerances.py): at most 2x (gradients 3x) the error of
torch's own SDPA in the same dtype, plus a small floor that does not grow with any size.

Each example is a plain dict (a spec) that builds its tensors from a seed; a failing one goes
into tests/regressions/attention.json, which test_regression_cases replays every run. Hypothesis
profiles in tests/fuzzing.py (``CI`` set: derandomized, no database).
"""
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import bigmodel
from bigmodel.reference import ref_attention
from fuzzing import fuzz_settings, regression_params
from paths import on
from peers import assert_attention_matches


DTYPES = {"float32": torch.float32, "float64": torch.float64, "bfloat16": torch.bfloat16,
          "float16": torch.float16}
# 'cuda': the default path for CUDA tensors (Triton compiled), run by bench/device_check.sh.
PATH_DTYPES = {"cpp": ["float32", "float64", "bfloat16", "float16"], "triton": ["float32", "float16"],
               "cuda": ["float32", "float16", "bfloat16"]}
# The interpreter runs every tile step in numpy: a few 16/32-wide tiles per example at most.
LIMITS = {"cpp": dict(len=150, heads=12, batch=3), "triton": dict(len=40, heads=4, batch=2),
          "cuda": dict(len=700, heads=8, batch=3)}
HEAD_DIMS = {"cpp": [1, 8, 16, 40, 64, 72, 128], "triton": [1, 8, 16, 40, 64, 72],
             "cuda": [1, 8, 16, 40, 64, 72, 128, 256]}
LAYOUTS = ["contiguous", "blhe", "sliced", "expanded"]
MASKS = ["none", "bool", "additive", "causal"]


@st.composite
def specs(draw, backend):
    lim = LIMITS[backend]
    hkv = draw(st.integers(1, 3))
    group = draw(st.sampled_from([1, 1, 2, 3]))
    hq = hkv * group
    hq = min(hq, lim["heads"])
    hkv = hkv if hq % hkv == 0 else 1
    # Query/key ranks: (L, E), (H, L, E) or (B..., H, L, E).
    n_batch = draw(st.integers(0, 2))
    batch = [draw(st.integers(0 if n_batch else 1, lim["batch"])) for _ in range(n_batch)]
    has_heads = n_batch > 0 or draw(st.booleans())
    if not has_heads:
        hq = hkv = 1
    length = st.one_of(st.sampled_from([1, 7, 16, 17, 33]), st.integers(0, lim["len"]))
    e = draw(st.sampled_from(HEAD_DIMS[backend]))
    mask = draw(st.sampled_from(MASKS))
    full_mask_shape = [*batch, hq] if has_heads else []
    return dict(
        backend=backend,
        dtype=draw(st.sampled_from(PATH_DTYPES[backend])),
        batch=batch, has_heads=has_heads, hq=hq, hkv=hkv,
        # enable_gqa also when the head counts match (it must then change nothing).
        enable_gqa=hq != hkv or draw(st.booleans()),
        L=draw(length), S=draw(length), E=e,
        Ev=e if draw(st.booleans()) else draw(st.sampled_from(HEAD_DIMS[backend])),
        layout_q=draw(st.sampled_from(LAYOUTS)), layout_kv=draw(st.sampled_from(LAYOUTS)),
        mask=mask,
        # Which dims of the mask are broadcast (1) instead of full; leading ones may be dropped.
        mask_broadcast=[draw(st.booleans()) for _ in range(len(full_mask_shape) + 2)],
        mask_drop_lead=draw(st.integers(0, len(full_mask_shape))),
        masked_rows=draw(st.sampled_from([0, 0, 1, 2])),  # query rows that see no key at all
        scale=draw(st.one_of(st.none(), st.floats(0.05, 2.0))),
        grads=draw(st.booleans()),
        seed=draw(st.integers(0, 2**31 - 1)),
    )


def _device(spec):
    return "cuda" if spec["backend"] == "cuda" else "cpu"


def _backend(spec):
    return "auto" if spec["backend"] == "cuda" else spec["backend"]


def _stored(values, layout, has_heads, gen):
    """``values`` (..., H, L, E) stored in ``layout``: 'blhe' keeps H and L swapped in memory (the
    (B, L, H, E) projections of a transformer), 'sliced' every other element of the last dim of a
    wider tensor, 'expanded' a stride-0 leading dim (every batch entry the same)."""
    if layout == "blhe" and has_heads and values.dim() >= 3:
        return values.transpose(-3, -2).contiguous().transpose(-3, -2)
    if layout == "sliced":
        wide = torch.randn(*values.shape[:-1], 2 * values.shape[-1], generator=gen).to(values.device, values.dtype)
        wide[..., ::2] = values
        return wide[..., ::2]
    if layout == "expanded" and values.dim() >= 4 and values.shape[0] > 0:
        return values[:1].expand(values.shape)
    return values.contiguous()


def build(spec):
    """(query, key, value, attn_mask, is_causal) for a spec."""
    gen = torch.Generator().manual_seed(spec["seed"])
    dtype, device = DTYPES[spec["dtype"]], _device(spec)
    heads_q = [spec["hq"]] if spec["has_heads"] else []
    heads_kv = [spec["hkv"]] if spec["has_heads"] else []
    batch, L, S, E, Ev = spec["batch"], spec["L"], spec["S"], spec["E"], spec["Ev"]

    def rand(*shape):
        # Drawn on the CPU (one stream of numbers per seed on every device), laid out on the device.
        return torch.randn(*shape, generator=gen).to(device, dtype)

    q = _stored(rand(*batch, *heads_q, L, E), spec["layout_q"], spec["has_heads"], gen)
    k = _stored(rand(*batch, *heads_kv, S, E), spec["layout_kv"], spec["has_heads"], gen)
    v = _stored(rand(*batch, *heads_kv, S, Ev), spec["layout_kv"], spec["has_heads"], gen)
    mask, causal = None, spec["mask"] == "causal"
    if spec["mask"] in ("bool", "additive"):
        full = [*batch, *heads_q, L, S]
        shape = [1 if bc else d for d, bc in zip(full, spec["mask_broadcast"])][spec["mask_drop_lead"]:]
        if spec["mask"] == "bool":
            mask = torch.rand(*shape, generator=gen) < 0.75
            if spec["masked_rows"] and shape[-2] > 0:
                mask[..., : spec["masked_rows"], :] = False
            mask = mask.to(device)
        else:
            mask = torch.randn(*shape, generator=gen)
            mask = mask.masked_fill(torch.rand(*shape, generator=gen) < 0.2, float("-inf"))
            if spec["masked_rows"] and shape[-2] > 0:
                mask[..., : spec["masked_rows"], :] = float("-inf")
            mask = mask.to(device, dtype)
    return q, k, v, mask, causal


def check(spec):
    """Forward (and backward) error vs float64 by the house rule. A row with no key (S = 0,
    masks, causal with L > S) must give 0 and gradient 0."""
    dtype = DTYPES[spec["dtype"]]
    q, k, v, mask, causal = build(spec)
    kwargs = dict(attn_mask=mask, is_causal=causal, scale=spec["scale"], enable_gqa=spec["enable_gqa"])
    with on(_backend(spec)):
        out = bigmodel.scaled_dot_product_attention(q, k, v, **kwargs)
        leaves = [t.detach().clone().requires_grad_(spec["grads"]) for t in (q, k, v)]
        ours = bigmodel.scaled_dot_product_attention(*leaves, **kwargs)
        gen = torch.Generator().manual_seed(spec["seed"] + 1)
        grad = torch.randn(ours.shape, generator=gen).to(ours.device, dtype)
        grads = torch.autograd.grad(ours, leaves, grad) if spec["grads"] and ours.numel() else None
    lead = ([*spec["batch"], spec["hq"]] if spec["has_heads"] else [])
    assert out.shape == (*lead, spec["L"], spec["Ev"]) and out.dtype == dtype and out.device == q.device
    assert torch.equal(out, ours.detach()), "the forward with grad enabled differs from the one without"
    if spec["S"] == 0:  # no keys at all (ref_attention cannot reduce over an empty dim)
        assert not out.any()
        assert grads is None or all(not g.any() for g in grads)
        return
    assert_attention_matches(out, q, k, v, grad, grads, f"{spec}", rounds_operands=spec["backend"] != "cpp", **kwargs)


@fuzz_settings(max_examples=60)
@given(spec=specs("cpp"))
def test_fuzz_cpp(spec):
    check(spec)


# numpy warns about the padding lanes of a key block past S in the dK/dV kernel (exp of a score
# that is never masked there overflows fp16, then inf * 0): those lanes are never stored.
@pytest.mark.filterwarnings("ignore:overflow encountered in cast:RuntimeWarning")
@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")
@fuzz_settings(max_examples=30)
@given(spec=specs("triton"))
def test_fuzz_triton_interpreted(spec):
    check(spec)


@pytest.mark.cuda
@fuzz_settings(max_examples=40)
@given(spec=specs("cuda"))
def test_fuzz_cuda(spec):
    """The compiled Triton kernels on the GPU (bench/device_check.sh): longer rows, head dims to 256, bf16."""
    check(spec)


@pytest.mark.parametrize("spec", regression_params("attention"))
def test_regression_cases(spec):
    """Examples kept from past failures (and hand-picked edge cases): replayed every run."""
    check(spec)


def test_scale_is_used():
    # A guard on the fuzzer itself: a custom scale must change the result (so fuzzing it means something).
    q, k, v = (torch.randn(1, 1, 5, 8) for _ in range(3))
    a = bigmodel.scaled_dot_product_attention(q, k, v, scale=0.1)
    b = bigmodel.scaled_dot_product_attention(q, k, v, scale=1.0)
    assert not torch.allclose(a, b)
    torch.testing.assert_close(a, ref_attention(q, k, v, scale=0.1))
