"""One tolerance table per dtype, and the FlashAttention error rule, for every test.

Elementwise ops (linear_relu) compare against the float64 reference with atol/rtol scaled by
sqrt(K) (a K-long dot product's rounding error grows like sqrt(K)). Reductions like attention use
the FlashAttention rule: our error against float64 is at most FACTOR x the error of the same-dtype
PyTorch computation (plus a small floor, scaled by the values, for when torch happens to be exact).
"""
import math

import torch

# dtype -> (atol, rtol) for one length-1 product; scaled by sqrt(K) in assert_close_gemm.
GEMM = {
    torch.float64: (1e-12, 1e-12),
    torch.float32: (2e-6, 2e-6),   # ieee fp32 (interpreter/CPU); tf32 uses TF32_GEMM
    torch.float16: (2e-3, 2e-3),
    torch.bfloat16: (1.6e-2, 1.6e-2),
}
TF32_GEMM = (2e-3, 2e-3)

FORWARD_FACTOR = 2.0   # FlashAttention rule: forward error <= 2x torch's same-dtype error
BACKWARD_FACTOR = 3.0  # gradients: <= 3x
FLOOR = {torch.float64: 1e-12, torch.float32: 1e-6, torch.float16: 1e-3, torch.bfloat16: 8e-3}


def gemm_tol(dtype, k):
    atol, rtol = GEMM[dtype]
    scale = math.sqrt(max(k, 1))
    return atol * scale, rtol * scale


def assert_close_gemm(actual, expected, dtype, k, what=""):
    atol, rtol = gemm_tol(dtype, k)
    torch.testing.assert_close(actual.double(), expected.double(), atol=atol, rtol=rtol,
                               equal_nan=True, msg=lambda m: f"{what} ({dtype}, K={k}): {m}")


def max_err(a, b):
    """Max abs difference, NaN-aware: matching NaNs count as 0, a NaN on one side only as inf."""
    a, b = a.double(), b.double()
    both = torch.isnan(a) & torch.isnan(b)
    one = torch.isnan(a) ^ torch.isnan(b)
    if one.any():
        return math.inf
    d = (a - b).abs().masked_fill(both, 0)
    return d.max().item() if d.numel() else 0.0


def magnitude(t):
    """max(1, largest finite |value|): what the absolute floor scales with."""
    finite = t[torch.isfinite(t)]
    return max(1.0, finite.abs().max().item()) if finite.numel() else 1.0


def assert_flash_rule(ours, torch_same_dtype, ref64, dtype, factor=FORWARD_FACTOR, what="", scale=None):
    """Our error vs float64 <= factor * (torch's same-dtype error vs float64) + floor * scale.

    The floor covers cases where torch happens to be nearly exact. It scales with the values
    (``scale`` defaults to magnitude(ref64)): a FlashAttention backward recomputes P from the
    saved log-sum-exp, so its error is relative to the size of what it sums (seen in CI: fp32
    dropout dV of magnitude 6.3 off by 5.3e-6 = 1.6e-6 relative, torch's error 9.6e-7)."""
    ours_err = max_err(ours, ref64)
    torch_err = max_err(torch_same_dtype, ref64)
    scale = magnitude(ref64) if scale is None else scale
    bound = factor * torch_err + FLOOR[dtype] * scale
    assert ours_err <= bound, (
        f"{what} ({dtype}): error {ours_err:.3g} > {factor} x torch's {torch_err:.3g}"
        f" + {FLOOR[dtype]:g} x {scale:.3g}"
    )


def assert_attention_grads(ours, torch_same_dtype, ref64, dtype, what=""):
    """(dq, dk, dv) by the FlashAttention rule, the floor scaled by the largest of the three.

    One gradient can be exactly 0 in float64 while its rounding error is the size of the others:
    with one visible key (causal, first query) P is one-hot and dq = P * (dP - D) * K cancels to
    0, but dP and D are rounded sums of dO * V (seen in CI: dq off by 1.4e-6 where torch's fp32
    happened to cancel exactly)."""
    scale = max(magnitude(r) for r in ref64)
    for name, a, b, c in zip(("dq", "dk", "dv"), ours, torch_same_dtype, ref64):
        assert a.shape == c.shape and a.dtype == dtype, f"{what} {name}: {a.shape} {a.dtype}"
        assert_flash_rule(a, b, c, dtype, BACKWARD_FACTOR, f"{what} {name}", scale)
