"""The persistent TMA forward of linear_relu (plain and warp-specialised) against float64 through
the registered op under the interpreter, and the Triton launcher's argument checks.

The interpreter runs the persistent kernel on 3 programs, so each of them walks several output
tiles (the grouped order, the tile loop and the TMA edge tiles past M, N and K are all
exercised). Accuracy: the house rule (tests/tolerances.py) against torch's same-dtype result.
"""
import pytest
import torch

from tolerances import FORWARD, assert_matches
from triton_on_cpu import fixtures, use_variant

pytestmark = pytest.mark.filterwarnings("ignore:.*[Oo]verrid.*:UserWarning")

VARIANTS = ("tma", "tma_ws")


kernels, triton_on_cpu = fixtures("linear_relu")


def _torch(x, w, b):
    return torch.relu(torch.nn.functional.linear(x, w, b))


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("dtype", (torch.float32, torch.float16))
@pytest.mark.parametrize("M, N, K", [(70, 56, 72), (33, 96, 40), (130, 8, 24)])
def test_matches_float64(triton_on_cpu, kernels, monkeypatch, variant, dtype, M, N, K):
    """Edge tiles in M, N and K (tiles of 32), more tiles than programs; NaN in one input row
    reaches exactly that output row; the backward (pointer kernels) sees the variant's output."""
    use_variant(monkeypatch, variant)
    x = torch.randn(M, K, dtype=dtype)
    w = torch.randn(N, K, dtype=dtype) / K**0.5
    b = torch.randn(N, dtype=dtype)
    x[3, K // 2] = float("nan")
    ours = torch.ops.bigmodel.linear_relu(x, w, b)
    flags = kernels._linear_relu_fwd_kernel.best_config.kwargs
    assert flags["TMA"] and flags["WS"] == (variant == "tma_ws")
    ref = _torch(x.double(), w.double(), b.double())
    assert torch.equal(torch.isnan(ours), torch.isnan(ref)) and torch.isnan(ours[3]).all()
    assert_matches(ours, _torch(x, w, b), ref, FORWARD, f"{variant} {(M, N, K)}")
    monkeypatch.setenv("BIGMODEL_TRITON_VARIANT", "plain")
    # Not bitwise: the interpreter's dots are numpy's BLAS, whose rounding depends on the operand
    # layout (the TMA tile is W, the pointer tile W^T). Both by the house rule, same NaN rows.
    plain = torch.ops.bigmodel.linear_relu(x, w, b)
    assert torch.equal(torch.isnan(plain), torch.isnan(ours))
    assert_matches(plain, _torch(x, w, b), ref, FORWARD, f"plain {(M, N, K)}")



@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("act", ("gelu", "tanh"))
def test_fused_linear_activation_epilogue(triton_on_cpu, kernels, monkeypatch, variant, act):
    """fused_linear's epilogue on the persistent kernel: GELU also stores the pre-activation
    through its own descriptor, Tanh does not; both against the pointer kernel and float64."""
    use_variant(monkeypatch, variant)
    x, w, b = torch.randn(70, 40), torch.randn(56, 40) / 40**0.5, torch.randn(56)
    out, pre = torch.ops.bigmodel.fused_linear(x, w, b, act, 0.0)
    assert kernels._linear_relu_fwd_kernel.best_config.kwargs["TMA"]
    z = torch.nn.functional.linear(x.double(), w.double(), b.double())
    f = torch.nn.functional.gelu if act == "gelu" else torch.tanh
    assert_matches(out, f(torch.nn.functional.linear(x, w, b)), f(z), FORWARD, f"{variant} {act}")
    if act == "gelu":
        assert_matches(pre, torch.nn.functional.linear(x, w, b), z, FORWARD, f"{variant} pre")
    else:
        assert pre.numel() == 0
    monkeypatch.setenv("BIGMODEL_TRITON_VARIANT", "plain")
    plain_out, plain_pre = torch.ops.bigmodel.fused_linear(x, w, b, act, 0.0)  # within rounding (see above)
    torch.testing.assert_close(out, plain_out)
    torch.testing.assert_close(pre, plain_pre)

def test_no_bias_and_empty_reduction(triton_on_cpu, monkeypatch):
    """Without a bias; and K = 0, which TMA cannot address: relu(bias) from the pointer kernel
    even when a variant is forced."""
    use_variant(monkeypatch, "tma")
    x, w = torch.randn(40, 32), torch.randn(24, 32)
    torch.testing.assert_close(torch.ops.bigmodel.linear_relu(x, w, None), _torch(x, w, None), rtol=1e-5, atol=1e-5)
    b = torch.randn(24)
    out = torch.ops.bigmodel.linear_relu(torch.randn(5, 0), torch.randn(24, 0), b)
    assert torch.equal(out, torch.relu(b).expand(5, 24))


def test_deterministic(triton_on_cpu, monkeypatch):
    use_variant(monkeypatch, "tma_ws")
    x, w, b = torch.randn(100, 48, dtype=torch.float16), torch.randn(40, 48, dtype=torch.float16), None
    assert torch.equal(torch.ops.bigmodel.linear_relu(x, w, b), torch.ops.bigmodel.linear_relu(x, w, b))


def test_forced_variant_needs_tma_aligned_tensors(triton_on_cpu, monkeypatch):
    monkeypatch.setenv("BIGMODEL_TRITON_VARIANT", "tma")
    with pytest.raises(ValueError, match=r"not TMA-aligned.*\(9, 10\)"):  # 10 fp32 = 40-byte rows
        torch.ops.bigmodel.linear_relu(torch.randn(9, 10), torch.randn(8, 10), None)


@pytest.mark.parametrize("call, error, words", [
    (lambda r: r.fwd(r.x, torch.randn(5, 7), r.b), ValueError, r"x \(6, 4\) needs weight \(N, 4\).*\(5, 7\)"),
    (lambda r: r.fwd(r.x, r.w, torch.randn(3)), ValueError, r"bias \(3,\)"),
    (lambda r: r.fwd(r.x[0], r.w, r.b), ValueError, r"expected x \(M, K\).*\(4,\)"),
    (lambda r: r.fwd(r.x, r.w.double(), r.b), TypeError, "weight dtype torch.float64"),
    (lambda r: r.fwd(r.x.to(torch.int32), r.w, r.b), TypeError, "float16, bfloat16 or float32"),
    (lambda r: r.fwd(r.x, r.w.to("meta"), r.b), ValueError, "weight is on meta"),
    (lambda r: r.bwd(torch.randn(6, 4), r.y, r.x, r.w, [True] * 3), ValueError,
     r"grad_output must have shape \(6, 5\)"),
    (lambda r: r.bwd(r.y, r.y[:3], r.x, r.w, [True] * 3), ValueError, r"output must have shape \(6, 5\).*\(3, 5\)"),
    (lambda r: r.bwd(r.y, r.y, r.x, torch.randn(5, 3), [True] * 3), ValueError, r"weight \(N, 4\)"),
    (lambda r: r.bwd(r.y.half(), r.y, r.x, r.w, [True] * 3), TypeError, "grad_output dtype torch.float16"),
    (lambda r: r.bwd(r.y, r.y, r.x, r.w, [True]), ValueError, "output_mask must have 3 entries"),
])
def test_launcher_checks_its_arguments(triton_on_cpu, kernels, call, error, words):
    """A mismatched weight would read out of bounds: the launcher raises first, naming the shapes
    (reached through the registered op where the dispatcher lets it, directly for devices)."""

    class Args:
        x, w, b = torch.randn(6, 4), torch.randn(5, 4), torch.randn(5)
        y = torch.relu(torch.randn(6, 5))

        @staticmethod
        def fwd(x, w, b):
            if w.device != x.device:
                return kernels.linear_relu_fwd(x, w, b)
            return torch.ops.bigmodel.linear_relu(x, w, b)

        @staticmethod
        def bwd(g, y, x, w, mask):
            return torch.ops.bigmodel.linear_relu_backward(g, y, x, w, mask)

    with pytest.raises(error, match=words):
        call(Args)


@pytest.mark.cuda
@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("dtype", (torch.bfloat16, torch.float16))
def test_cuda_variants_match_float64(monkeypatch, kernels, variant, dtype):
    """On the H200 (bench/device_check.sh): the compiled persistent kernel, warp-specialised or
    not, at the MLP's shapes and an odd one."""
    use_variant(monkeypatch, variant)
    for M, N, K in ((4096, 512, 784), (1023, 264, 136)):
        x = torch.randn(M, K, dtype=dtype, device="cuda")
        w = torch.randn(N, K, dtype=dtype, device="cuda") / K**0.5
        b = torch.randn(N, dtype=dtype, device="cuda")
        ours = torch.ops.bigmodel.linear_relu(x, w, b)
        assert kernels._linear_relu_fwd_kernel.best_config.kwargs["TMA"]
        assert_matches(ours, _torch(x, w, b), _torch(x.double(), w.double(), b.double()), FORWARD,
                       f"{variant} {(M, N, K)}")
