"""The house error rule, one for every op (GEMMs and attention alike), forward and backward.

Our error against a float64 reference must be at most FORWARD (2x) or GRADIENT (3x) the error of
the same-dtype PyTorch computation on the same inputs, plus a small floor for cases where torch
happens to be (nearly) exact. The error is measured two ways, and both must hold:

* RMS, sqrt(mean((x - ref)^2)): the bulk accuracy. Rounding once at the end gives every element
  at most half an ulp (RMS ~0.16% in bf16), so a uniform 1% error in fp16/bf16 is well above
  2 x torch's RMS error + the floor at any size (bf16: 0.71%). The floor, half an ulp of the
  reference's RMS, covers small outputs, where a ratio of two RMS errors over a few elements is
  noisy (a 1-D input's 17 outputs: 2.3x torch's fp32 error, both about one ulp).
* max |x - ref|: one wrong element (an edge tile, a broadcast). Maxima of rounding errors are
  noisy (the largest of many half-ulps, or a logsumexp recomputed in the backward), so the floor
  here is 4 ulps of the reference's largest value.

Neither floor grows with a size: both scale with the values and the dtype's epsilon only. NaN
counts as equal to NaN; a NaN on one side only is an infinite error.
"""
import math

import torch

FORWARD = 2.0
GRADIENT = 3.0

# Unit roundoff of each dtype (the distance from 1 to the next number).
EPS = {torch.float64: 2.0**-52, torch.float32: 2.0**-23, torch.float16: 2.0**-10, torch.bfloat16: 2.0**-7}
# (rms, max) ulps of the accumulation precision (fp32; fp64 for fp64): what the arithmetic inside
# a kernel leaves besides the final rounding. Small outputs show it: softmax over 7 keys with a
# 2-ulp vectorised exp gave 1.4 fp32 ulps where torch's happened to give 0.4. In fp16/bf16 this
# is far below the output's own ulp, so a 1% error stays visible.
ACCUMULATED_ULPS = (4, 16)
# (rms, max) floors in ulps. float64's peer is the float64 truth itself, so torch's error is 0
# there and the floor is all the slack there is: 16 / 64 ulps (~1e-14 relative), far below any
# real bug but above a different summation order over a few thousand terms.
FLOOR_ULPS = {torch.float64: (16, 64), torch.float32: (1 / 2, 4), torch.float16: (1 / 2, 4),
              torch.bfloat16: (1 / 2, 4)}


def _diff(a, b):
    """|a - b| in float64 with matching NaNs as 0; None when a NaN stands on one side only."""
    a, b = a.double(), b.double()
    if (torch.isnan(a) ^ torch.isnan(b)).any():
        return None
    same_inf = torch.isinf(a) & (a == b)  # inf - inf would be NaN
    return (a - b).abs().masked_fill(torch.isnan(a) | same_inf, 0)


def max_err(a, b):
    """Largest |a - b| (NaN-aware; inf for a one-sided NaN)."""
    d = _diff(a, b)
    if d is None:
        return math.inf
    return d.max().item() if d.numel() else 0.0


def rms_err(a, b):
    """sqrt(mean((a - b)^2)) (NaN-aware; inf for a one-sided NaN)."""
    d = _diff(a, b)
    if d is None:
        return math.inf
    return d.square().mean().sqrt().item() if d.numel() else 0.0


def _finite(t):
    t = t.double()
    return t[torch.isfinite(t)]


def magnitude(t):
    """Largest finite |value| (0 for none): what the max floor scales with."""
    f = _finite(t)
    return f.abs().max().item() if f.numel() else 0.0


def rms(t):
    """RMS of the finite values (0 for none): what the RMS floor scales with."""
    f = _finite(t)
    return f.square().mean().sqrt().item() if f.numel() else 0.0


def check(ours, peer, ref64, factor=FORWARD, what="", scales=None, accumulated=None, rounded=None):
    """Error messages (empty when fine) for ``ours`` against ``ref64``, bounded by ``factor`` x the
    error of ``peer`` (the same-dtype torch computation) plus the floors. ``scales`` = (rms, max)
    overrides the floors' scales (default: rms(ref64), magnitude(ref64)). The floor also holds
    ACCUMULATED_ULPS ulps of the accumulation precision (fp32, or fp64 for fp64), at the same
    scales or at ``accumulated`` = (rms, max) (see assert_grads_match). ``rounded`` = (expected
    RMS, largest), absolute errors a kernel's algorithm makes by design where the peer's does not
    (attention's probabilities rounded to fp16 for a tensor-core product:
    peers.rounded_operand_floors), joins the peer's error as that algorithm's would."""
    assert ours.shape == ref64.shape, f"{what}: shape {tuple(ours.shape)} != {tuple(ref64.shape)}"
    assert peer.shape == ref64.shape, f"{what}: torch's shape {tuple(peer.shape)} != {tuple(ref64.shape)}"
    dtype = ours.dtype
    eps = EPS[dtype]
    acc_eps = EPS[torch.float64 if dtype == torch.float64 else torch.float32]
    rms_scale, max_scale = scales if scales is not None else (rms(ref64), magnitude(ref64))
    acc_rms, acc_max = accumulated if accumulated is not None else (rms_scale, max_scale)
    rms_ulps, max_ulps = FLOOR_ULPS[dtype]
    # The RMS of n rounding errors is a mean of n draws, its noise falling as 1/sqrt(n); for one
    # element it is the max itself. So the RMS floor is never below the max floor / sqrt(n)
    # (0.5 ulp from n = 64 on): a single fp16 gradient came out 1.1 ulps off where torch's 0.1.
    n = max(ours.numel(), 1)
    rms_ulps, acc_rms_ulps = max(rms_ulps, max_ulps / math.sqrt(n)), max(ACCUMULATED_ULPS[0],
                                                                         ACCUMULATED_ULPS[1] / math.sqrt(n))
    design_rms, design_max = rounded if rounded is not None else (0.0, 0.0)
    problems = []
    for name, err, floor in (
            ("rms", rms_err, rms_ulps * eps * rms_scale + acc_rms_ulps * acc_eps * acc_rms),
            ("max", max_err, max_ulps * eps * max_scale + ACCUMULATED_ULPS[1] * acc_eps * acc_max)):
        mine, theirs = err(ours, ref64), err(peer, ref64)
        # A peer with NaN where the truth has none would make any error pass: a broken test.
        assert math.isfinite(theirs), f"{what}: torch's {name} error is {theirs}: the peer is not comparable"
        # An algorithm's own rounding is independent of the final one: the peer running that
        # algorithm would be off by sqrt(theirs^2 + design^2) in RMS, by at most the sum at a maximum.
        bound = factor * (math.hypot(theirs, design_rms) if name == "rms" else theirs + design_max) + floor
        if not mine <= bound:
            design = (design_rms if name == "rms" else design_max) if rounded is not None else 0.0
            joined = f" (with the algorithm's own {design:.3g})" if design else ""
            problems.append(f"{what} ({dtype}): {name} error {mine:.3g} > {factor:g} x torch's "
                            f"{theirs:.3g}{joined} + floor {floor:.3g}")
    return problems


def assert_matches(ours, peer, ref64, factor=FORWARD, what="", scales=None, accumulated=None, rounded=None):
    """Asserts the house rule (see the module docstring) for one tensor."""
    problems = check(ours, peer, ref64, factor, what, scales, accumulated, rounded)
    assert not problems, "; ".join(problems)


def assert_grads_match(ours, peer, ref64, names, what="", accumulated=None, rounded=None):
    """The rule with GRADIENT for each gradient in ``ours`` (a sequence, None entries skipped);
    ``accumulated`` as for check, shared by the gradients (attention's: see
    peers._arithmetic_scales); ``rounded``: one (rms, max) per gradient, as for check."""
    problems = []
    rounded = rounded if rounded is not None else [None] * len(names)
    for name, a, b, c, r in zip(names, ours, peer, ref64, rounded):
        if a is not None:
            problems += check(a, b, c, GRADIENT, f"{what} {name}", accumulated=accumulated, rounded=r)
    assert not problems, "; ".join(problems)
