"""Property-based fuzzing of bigmodel.linear_relu against the float64 reference, forward and
backward, by the house rule (tests/tolerances.py), on every path CI runs: the C++ engine ('cpp')
and the Triton kernels under the interpreter ('triton'; see tests/paths.py).

Each example is a plain dict (a *spec*: backend, dtype, shapes, layouts, seed) that builds its
tensors deterministically, so a failing example is replayed by pasting the spec hypothesis prints
into tests/regressions/linear_relu.json (test_regression_cases runs every entry there).

Hypothesis profiles are in tests/fuzzing.py (``CI`` set: derandomized, no database).
"""
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import bigmodel
from fuzzing import fuzz_settings, regression_params
from paths import on
from peers import assert_linear_relu_matches

DTYPES = {"float32": torch.float32, "float64": torch.float64, "bfloat16": torch.bfloat16,
          "float16": torch.float16}
# The interpreter's bf16 is broken (it computes on raw bit patterns) and it has no fp64 dot.
# 'cuda': the default path for CUDA tensors (Triton compiled), run by bench/device_check.sh.
PATH_DTYPES = {"cpp": ["float32", "float64", "bfloat16", "float16"], "triton": ["float32", "float16"],
               "cuda": ["float32", "float16", "bfloat16"]}
# The interpreter costs ~ms per 32-wide tile step: its shapes stay within a few tiles.
LIMITS = {"cpp": dict(m=300, k=260, n=200), "triton": dict(m=40, k=70, n=40),
          "cuda": dict(m=3000, k=1100, n=700)}
X_LAYOUTS = ["contiguous", "transposed", "sliced", "expanded"]
W_LAYOUTS = ["contiguous", "transposed", "sliced"]


@st.composite
def specs(draw, backend):
    lim = LIMITS[backend]
    n_lead = draw(st.integers(0, 3))
    # Leading dims whose product stays within the row budget; 0 (an empty batch) now and then.
    lead, rows = [], 1
    for _ in range(n_lead):
        d = draw(st.integers(0, max(1, min(7, lim["m"] // max(rows, 1)))))
        lead.append(d)
        rows *= max(d, 1)
    if n_lead and rows < lim["m"] // 4 and draw(st.booleans()):
        lead[-1] = draw(st.integers(1, lim["m"] // max(rows // max(lead[-1], 1), 1)))
    return dict(
        backend=backend,
        dtype=draw(st.sampled_from(PATH_DTYPES[backend])),
        lead=lead,
        k=draw(st.one_of(st.sampled_from([0, 1, 7, 16, 33, 40, 64]), st.integers(1, lim["k"]))),
        n=draw(st.one_of(st.sampled_from([1, 7, 17, 32]), st.integers(1, lim["n"]))),
        bias=draw(st.booleans()),
        x_layout=draw(st.sampled_from(X_LAYOUTS)),
        w_layout=draw(st.sampled_from(W_LAYOUTS)),
        bias_sliced=draw(st.booleans()),
        grads=draw(st.sampled_from(["all", "input", "weight", "none"])),
        seed=draw(st.integers(0, 2**31 - 1)),
    )


def _device(spec):
    return "cuda" if spec["backend"] == "cuda" else "cpu"


def _backend(spec):
    return "auto" if spec["backend"] == "cuda" else spec["backend"]


def _with_layout(values, layout, gen):
    """A tensor equal to ``values`` stored with ``layout``: transposed (last two dims swapped in
    memory), sliced (every other element of a wider tensor), or expanded (a stride-0 dim)."""
    if layout == "transposed" and values.dim() >= 2:
        return values.transpose(-1, -2).contiguous().transpose(-1, -2)
    if layout == "sliced":
        wide = torch.randn(*values.shape[:-1], 2 * values.shape[-1], generator=gen).to(values.device, values.dtype)
        wide[..., ::2] = values
        return wide[..., ::2]
    return values.contiguous()


def build(spec):
    """(x, w, b) for a spec: x (*lead, k), w (n, k), b (n,) or None, with the spec's layouts."""
    gen = torch.Generator().manual_seed(spec["seed"])
    dtype, device = DTYPES[spec["dtype"]], _device(spec)
    k, n, lead = spec["k"], spec["n"], list(spec["lead"])
    # Scaled so pre-activations are O(1) in every dtype and about half the outputs are positive.
    scale = max(k, 1) ** -0.25

    def rand(*shape, s=scale):
        # Drawn on the CPU (one stream of numbers per seed on every device), laid out on the device.
        return (torch.randn(*shape, generator=gen) * s).to(device, dtype)

    if spec["x_layout"] == "expanded":
        # A broadcast dim (stride 0) in front: the same rows read several times.
        reps = lead[0] if lead else 1
        one = rand(1, *lead[1:], k)
        x = one.expand(reps, *lead[1:], k) if lead else one[0]
    else:
        x = _with_layout(rand(*lead, k), spec["x_layout"], gen)
    w = _with_layout(rand(n, k), spec["w_layout"], gen)
    b = None
    if spec["bias"]:
        b = _with_layout(rand(n, s=1.0), "sliced" if spec["bias_sliced"] else "", gen)
    return x, w, b


def check(spec):
    """Forward against float64; backward against the float64 gradients of the same ReLU mask."""
    dtype = DTYPES[spec["dtype"]]
    x, w, b = build(spec)
    want = {"all": (True, True, True), "input": (True, False, False),
            "weight": (False, True, True), "none": (False, False, False)}[spec["grads"]]
    leaves = []
    for t, need in zip((x, w, b), want):
        if t is not None and need:
            t.requires_grad_(True)
            leaves.append(t)
    with on(_backend(spec)):
        y = bigmodel.linear_relu(x, w, b)
        assert y.dtype == dtype and y.shape == (*x.shape[:-1], w.shape[0]) and y.device == x.device
        gen = torch.Generator().manual_seed(spec["seed"] + 1)
        grad = torch.randn(y.shape, generator=gen).to(y.device, dtype)
        grads = torch.autograd.grad(y, leaves, grad) if leaves else ()
    names = [nm for nm, t, need in zip("xwb", (x, w, b), want) if t is not None and need]
    assert_linear_relu_matches(y, x, w, b, grad, dict(zip(names, grads)), f"{spec}")


@fuzz_settings(max_examples=80)
@given(spec=specs("cpp"))
def test_fuzz_cpp(spec):
    check(spec)


@fuzz_settings(max_examples=50)
@given(spec=specs("triton"))
def test_fuzz_triton_interpreted(spec):
    check(spec)


@pytest.mark.cuda
@fuzz_settings(max_examples=40)
@given(spec=specs("cuda"))
def test_fuzz_cuda(spec):
    """The compiled Triton kernels on the GPU (bench/device_check.sh), at larger sizes and in bf16."""
    check(spec)


@pytest.mark.parametrize("spec", regression_params("linear_relu"))
def test_regression_cases(spec):
    """Examples kept from past failures (and hand-picked edge cases): replayed every run."""
    check(spec)
