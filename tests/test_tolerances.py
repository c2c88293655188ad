"""The comparison helpers must reject planted errors: a test that cannot fail is a defect.

Each case computes bigmodel's real output (and gradients), checks that the house rule accepts it,
then plants one error the review found the old tolerances let through and checks that the rule
rejects it: 1% in fp16/bf16 at large K and at long key lengths, 1e-4 in fp32, a dropped last K
tile, a wrong bias broadcast, and 2% / 1% in a gradient; 1% in attention's output and in each
gradient also with the floors of the Triton kernels' rounded operands (P and dS in fp16/bf16).
"""
import pytest
import torch

import bigmodel
from peers import attention_truth_and_peer, fused_linear_truth_and_peer, rounded_operand_floors
from tolerances import FORWARD, GRADIENT, check

LOW = [torch.float16, torch.bfloat16]
ALL = [torch.float32, *LOW]
M, K, N = 256, 784, 512  # the seed's first layer; K is not a multiple of 64 (12 tiles + 16)


def _linear(dtype, m=M, k=K, n=N):
    x = (torch.randn(m, k) / k**0.25).to(dtype).requires_grad_()
    w = (torch.randn(n, k) / k**0.25).to(dtype).requires_grad_()
    b = torch.randn(n).to(dtype).requires_grad_()
    y = bigmodel.linear_relu(x, w, b)
    grad = torch.randn_like(y)
    grads = torch.autograd.grad(y, (x, w, b), grad)
    (out64, grads64), (peer, peer_grads) = fused_linear_truth_and_peer(x, w, b, grad, y, "relu")
    return dict(x=x, w=w, b=b, y=y.detach(), grads=grads, out64=out64, grads64=grads64, peer=peer,
                peer_grads=peer_grads)


def _attention(dtype, L=64, S=512, E=64):
    q, k, v = (torch.randn(2, 4, n, E).to(dtype).requires_grad_() for n in (L, S, S))
    out = bigmodel.scaled_dot_product_attention(q, k, v)
    grad = torch.randn_like(out)
    grads = torch.autograd.grad(out, (q, k, v), grad)
    (out64, grads64), (peer, peer_grads) = attention_truth_and_peer(q, k, v, grad)
    return dict(y=out.detach(), grads=grads, out64=out64, grads64=grads64, peer=peer, peer_grads=peer_grads,
                qkv=(q, k, v), grad=grad)


def _accepts(case, y):
    return not check(y, case["peer"], case["out64"], FORWARD, "planted")


@pytest.mark.parametrize("make", [_linear, _attention], ids=["linear_relu", "attention"])
@pytest.mark.parametrize("dtype", ALL, ids=str)
def test_the_rule_accepts_the_real_output_and_gradients(make, dtype):
    case = make(dtype)
    assert _accepts(case, case["y"]), check(case["y"], case["peer"], case["out64"], FORWARD)
    for g, p, r in zip(case["grads"], case["peer_grads"], case["grads64"]):
        assert not check(g, p, r, GRADIENT)


@pytest.mark.parametrize("make", [_linear, _attention], ids=["linear_relu_K784", "attention_S512"])
@pytest.mark.parametrize("dtype", LOW, ids=str)
def test_one_percent_in_half_precision_is_rejected(make, dtype):
    case = make(dtype)
    assert not _accepts(case, (case["y"].double() * 1.01).to(dtype))


@pytest.mark.parametrize("make", [_linear, _attention], ids=["linear_relu", "attention"])
def test_1e4_in_fp32_is_rejected(make):
    case = make(torch.float32)
    assert not _accepts(case, case["y"] * (1 + 1e-4))


@pytest.mark.parametrize("dtype", ALL, ids=str)
def test_a_dropped_last_k_tile_is_rejected(dtype):
    case = _linear(dtype)
    kept = K // 64 * 64  # what a kernel that forgets the last, partial tile sums
    x, w, b = case["x"].detach(), case["w"].detach(), case["b"].detach()
    dropped = torch.relu(x[:, :kept].float() @ w[:, :kept].float().t() + b.float()).to(dtype)
    assert not _accepts(case, dropped)


@pytest.mark.parametrize("dtype", ALL, ids=str)
def test_a_wrong_bias_broadcast_is_rejected(dtype):
    case = _linear(dtype, m=N)  # square, so the bias added along the rows has a valid shape
    x, w, b = case["x"].detach(), case["w"].detach(), case["b"].detach()
    wrong = torch.relu(x.float() @ w.float().t() + b.float()[:, None]).to(dtype)
    assert not _accepts(case, wrong)


@pytest.mark.parametrize("make", [_linear, _attention], ids=["linear_relu", "attention"])
@pytest.mark.parametrize("dtype,error", [(torch.float32, 1e-4), (torch.float16, 0.01),
                                         (torch.bfloat16, 0.02)], ids=str)
def test_an_error_in_one_gradient_is_rejected(make, dtype, error):
    case = make(dtype)
    for i in range(3):
        grads = list(case["grads"])
        grads[i] = (grads[i].double() * (1 + error)).to(dtype)
        assert check(grads[i], case["peer_grads"][i], case["grads64"][i], GRADIENT), f"gradient {i}"


@pytest.mark.parametrize("dtype,error", [(torch.float16, 0.01), (torch.bfloat16, 0.02)], ids=str)
def test_an_error_is_rejected_with_the_rounded_operand_floors(dtype, error):
    """The Triton kernels' allowance for P and dS rounded to fp16/bf16 (the tensor-core products'
    operands) accepts that rounding and still rejects 1% (fp16) / 2% (bf16: see
    peers.rounded_operand_floors) at 512 keys, in the output and in each gradient."""
    case = _attention(dtype)
    rounded_out, rounded_grads = rounded_operand_floors(*case["qkv"], case["grad"])
    planted = (case["y"].double() * (1 + error)).to(dtype)
    assert check(planted, case["peer"], case["out64"], FORWARD, "planted", rounded=rounded_out)
    for i in range(3):
        g = (case["grads"][i].double() * (1 + error)).to(dtype)
        assert check(g, case["peer_grads"][i], case["grads64"][i], GRADIENT, rounded=rounded_grads[i]), i
    # The rounding itself passes: P rounded to the dtype before P V (in float64), then the output.
    q64, k64, v64 = (t.detach().double() for t in case["qkv"])
    p = torch.softmax(q64 @ k64.transpose(-2, -1) / 8, -1)
    by_design = (p.to(dtype).double() @ v64).to(dtype)
    assert not check(by_design, case["peer"], case["out64"], FORWARD, rounded=rounded_out)


def test_the_rounded_operand_floors_predict_the_error_through_d():
    """FlashAttention's D = rowsum(dO * O) reads an output summed from P rounded to fp16, while
    its backward recomputes P unrounded, so dS rows no longer sum to 0. Over few keys that is the
    largest error in dq and dk (a fuzzed fp16 case: 5x torch's). The floors' model of it must be
    the error's size, neither a blanket (a loose floor would let real errors through) nor short
    of it. An emulation of the kernels' roundings (P for P V, dS for the gradient products) in
    float64: the prediction is 1.5-2x its RMS over seeds (uniform relative rounding, an upper
    model); without the D term the emulation is 1.4-1.8x over the prediction."""
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(8, 2, n, 40, generator=gen).half() for n in (4, 5, 5))
    grad = torch.randn(8, 2, 4, 40, generator=gen).half()
    scale = 0.54
    _, (dq_floor, dk_floor, _) = rounded_operand_floors(q, k, v, grad, scale=scale)
    q64, k64, v64, g64 = (t.double() for t in (q, k, v, grad))
    p = torch.softmax(q64 @ k64.transpose(-2, -1) * scale, -1)
    dp = g64 @ v64.transpose(-2, -1)
    ds = p * (dp - (g64 * (p.half().double() @ v64)).sum(-1, keepdim=True))  # D from the rounded-P output
    exact = p * (dp - (g64 * (p @ v64)).sum(-1, keepdim=True))
    for name, got, truth, (floor_rms, _) in (
            ("dq", ds.half().double() @ k64 * scale, exact @ k64 * scale, dq_floor),
            ("dk", ds.half().double().transpose(-2, -1) @ q64 * scale, exact.transpose(-2, -1) @ q64 * scale,
             dk_floor)):
        err = (got - truth).square().mean().sqrt().item()
        assert err <= floor_rms <= 2.5 * err, f"{name}: error {err:.3g}, predicted {floor_rms:.3g}"
