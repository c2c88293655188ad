"""The two things every accuracy test compares against (see tolerances.py): the float64 truth,
and the same-dtype PyTorch computation (the peer) whose error sets the bound.

linear_relu's gradients, in both, go through the ReLU mask of the output under test. A
pre-activation within rounding of 0 may land on either side of the kink in fp32 while float64
puts it on the other; one such element moves a whole grad_input row by grad * W[j] (seen in CI:
0.42 against a 6e-5 tolerance, about once in 700 runs of a 1023x71 fp32 case). Both sides are
right, and the backward must follow the output it was given (as torch's does). The forward is
checked against float64 separately, so the masks can only differ where |pre-activation| is within
the forward's tolerance of 0.
"""
import math

import torch
import torch.nn.functional as F

from bigmodel.reference import ref_activation, ref_attention, ref_fused_linear, ref_linear_relu
from tolerances import EPS, FORWARD, assert_grads_match, assert_matches, magnitude, rms


def _detached(dtype, *tensors):
    return [None if t is None else t.detach().to(dtype) for t in tensors]


def linear_relu_grads(y, grad, x, w, b=None, dtype=torch.float64):
    """(grad_x, grad_w, grad_b) of relu(x W^T + b) computed in ``dtype``, through the mask of ``y``
    (the gradient passes where y > 0 or y is NaN, as torch's threshold_backward lets it).
    grad_b is None without b. In a 16-bit dtype each product rounds once, as torch's own."""
    n, k = w.shape
    m = math.prod(x.shape[:-1])  # spelled out: reshape(-1, 0) is ambiguous for an empty K
    x2, w2 = x.detach().to(dtype).reshape(m, k), w.detach().to(dtype)
    passes = ~(y.detach() <= 0)
    gz = (grad.detach().to(dtype) * passes).reshape(m, n)
    grad_b = gz.sum(0) if b is not None else None
    return (gz @ w2).reshape(x.shape), gz.t() @ x2, grad_b


def _flash_backward(q, k, v, out, grad, attn_mask, is_causal, scale, enable_gqa, dropout_p, keep):
    """(dq, dk, dv) the way FlashAttention (and torch's CPU flash kernel) computes them, in torch
    ops at torch's accumulation precision (fp32 for 16-bit inputs, fp64 for fp64), rounded once to
    the inputs' dtype: P recomputed from the scores, D = rowsum(dO * O) from the stored output,
    dS = P * (dP - D). Its D - dP cancellation leaves rounding noise in gradients that are exactly
    0 in theory (one visible key: dq = dk = 0), as every FlashAttention backward does; torch's math
    path, whose softmax backward cancels exactly there, would not be a fair peer."""
    dtype = q.dtype
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    qa, ka, va, ga, p, drop, scale = _flash_terms(q, k, v, grad, attn_mask, is_causal, scale, enable_gqa,
                                                  dropout_p, keep, acc)
    oa = out.detach().to(acc)
    dv = (p * drop).transpose(-2, -1) @ ga
    ds = p * ((ga @ va.transpose(-2, -1)) * drop - (ga * oa).sum(-1, keepdim=True))
    dq = ds @ ka * scale
    dk = ds.transpose(-2, -1) @ qa * scale
    return tuple(_summed_back(g, like).to(dtype) for g, like in ((dq, q), (dk, k), (dv, v)))


def _flash_terms(q, k, v, grad, attn_mask, is_causal, scale, enable_gqa, dropout_p, keep, acc):
    """(q, k, v, grad, P, dropout factor, scale) in ``acc``, keys and values repeated over the
    query heads for GQA, P (without dropout) by the reference's own rules: attention over the
    identity as values."""
    qa, ka, va, ga = (t.detach().to(acc) for t in (q, k, v, grad))
    heads = qa.shape[-3] if qa.dim() >= 3 else 1
    if enable_gqa and ka.dim() >= 3 and ka.shape[-3] != heads:
        ka, va = (t.repeat_interleave(heads // t.shape[-3], dim=-3) for t in (ka, va))
    mask = attn_mask.to(acc) if attn_mask is not None and attn_mask.is_floating_point() else attn_mask
    S = ka.shape[-2]
    eye = torch.eye(S, dtype=acc).expand(*ka.shape[:-2], S, S)
    p = ref_attention(qa, ka, eye, mask, 0.0, is_causal, scale)
    scale = 1.0 / math.sqrt(qa.shape[-1]) if scale is None else scale
    drop = keep.to(acc) / (1.0 - dropout_p) if keep is not None else 1.0
    return qa, ka, va, ga, p, drop, scale


def _summed_back(g, like):
    """A gradient over the broadcast (and GQA-repeated) shape summed back to ``like``'s shape."""
    if g.dim() >= 3 and like.dim() >= 3 and g.shape[-3] != like.shape[-3] and like.shape[-3] != 1:
        g = g.unflatten(-3, (like.shape[-3], g.shape[-3] // like.shape[-3])).sum(-3)
    return g.sum_to_size(like.shape)


def rounded_operand_floors(q, k, v, grad, attn_mask=None, is_causal=False, scale=None, enable_gqa=False,
                           dropout_p=0.0, dropout_keep=None):
    """((rms, max) for the output, [(rms, max) for dq, dk, dv]): the error a FlashAttention kernel
    makes by design in fp16/bf16, where P (forward, dV) and dS (dQ, dK) are rounded to the inputs'
    dtype as the operands of a tensor-core product (kernels/attention.py, as FlashAttention and
    torch's CUDA flash kernel do; torch's CPU peer keeps them in fp32). The forward's rounding of
    P also reaches dQ and dK through D = rowsum(dO * O). None for fp32/fp64.

    Each rounding is off by at most eps/2 relative, uniformly and independently per term, an RMS
    of at most eps / (2 sqrt 3); so an output sum_j p_j v_j is off by a random walk of RMS at most
    eps / (2 sqrt 3) * sqrt(sum_j p_j^2 v_j^2), and the RMS of that over the outputs is the
    expected RMS error (tolerances.check joins it to torch's in quadrature). Over n outputs that
    estimate is noisy as 1/sqrt(n), so it is never below the largest error / sqrt(n), as the
    floors are. The largest error is bounded by 2 eps * the largest walk: the hard bound
    eps/2 * sum_j |p_j v_j| up to 16 terms, ~7 standard deviations beyond. At S keys with random
    values the walk is about the output's own RMS, so this adds about a third of an ulp: a 1%
    error stays visible in fp16 (10 ulps); in bf16 1% is 1.3 ulps, within twice what any kernel
    that rounds P to bf16 makes (torch's CUDA flash kernel included), so 2% is the bf16 bound.
    Where an output cancels, the walk stays at the size of the terms: an fp16 row of 6 keys whose
    output cancelled to 0.034 came out 10 of its ulps off from this rounding alone."""
    if q.dtype not in (torch.float16, torch.bfloat16):
        return None, None
    eps = EPS[q.dtype]
    qa, ka, va, ga, p, drop, scale = _flash_terms(q, k, v, grad, attn_mask, is_causal, scale, enable_gqa,
                                                  dropout_p, dropout_keep, torch.float64)
    pd = p * drop
    out_walk = (pd.square() @ va.square()).sqrt()
    oa = pd @ va
    dp = (ga @ va.transpose(-2, -1)) * drop
    ds = p * (dp - (ga * oa).sum(-1, keepdim=True))
    # D = rowsum(dO * O) reads the output the forward summed from rounded P, while the backward
    # recomputes P unrounded: row i's D is off by the walk sum_j eps_j p_ij dP_ij, of RMS
    # eps / (2 sqrt 3) * d_walk_i, and every dS_ij = p_ij (dP_ij - D_i) carries it. In dq that
    # is D's error times (P K)_i; in dk a walk over the query rows i.
    d_walk_sq = (pd.square() * dp.square()).sum(-1, keepdim=True)
    dq_delta = d_walk_sq * (p @ ka).square()
    dk_delta = (p.square() * d_walk_sq).transpose(-2, -1) @ qa.square()
    walks = [(ds.square() @ ka.square() + dq_delta) * scale**2,
             (ds.square().transpose(-2, -1) @ qa.square() + dk_delta) * scale**2,
             pd.square().transpose(-2, -1) @ ga.square()]
    walks = [_summed_back(w, like).sqrt() for w, like in zip(walks, (q, k, v))]

    def floors(walk):
        if not walk.numel():
            return 0.0, 0.0
        largest = 2 * eps * magnitude(walk)
        return max(eps / (2 * math.sqrt(3)) * rms(walk), largest / math.sqrt(walk.numel())), largest

    return floors(out_walk), [floors(w) for w in walks]


def attention_truth_and_peer(q, k, v, grad, attn_mask=None, is_causal=False, scale=None,
                             enable_gqa=False, dropout_p=0.0, dropout_keep=None):
    """((out64, (dq, dk, dv)64), (out_peer, grads_peer)) for SDPA-contract inputs of any shape.

    The truth is bigmodel.reference.ref_attention in float64 (autograd through it). The peer's
    output is torch's own SDPA in the inputs' dtype (its CPU flash kernel accumulates 16-bit
    inputs in fp32, as ours does; with dropout, torch's math path given the same keep mask); its
    gradients are FlashAttention's formulas at torch's precision (see _flash_backward)."""
    def rank(t):
        # torch's SDPA wants inputs of one rank, at least 4-D: pad with leading 1s (views).
        return t.reshape((1,) * (max(q.dim(), k.dim(), v.dim(), 4) - t.dim()) + tuple(t.shape))

    leaves = [t.detach().double().requires_grad_() for t in (q, k, v)]
    mask64 = attn_mask.double() if attn_mask is not None and attn_mask.is_floating_point() else attn_mask
    out64 = ref_attention(*leaves, mask64, dropout_p, is_causal, scale, enable_gqa, dropout_keep)
    grads64 = torch.autograd.grad(out64, leaves, grad.double())
    q_, k_, v_ = (rank(t.detach()) for t in (q, k, v))
    mask = attn_mask.to(q.dtype) if attn_mask is not None and attn_mask.is_floating_point() else attn_mask
    if dropout_keep is None:
        peer = F.scaled_dot_product_attention(q_, k_, v_, attn_mask=mask, is_causal=is_causal, scale=scale,
                                              enable_gqa=enable_gqa)
    else:
        peer = torch.ops.aten._scaled_dot_product_attention_math(
            q_, k_, v_, mask, dropout_p, is_causal, dropout_keep.to(q.dtype), scale=scale,
            enable_gqa=enable_gqa)[0]
    peer = peer.reshape(out64.shape)
    peer_grads = _flash_backward(q, k, v, peer, grad, attn_mask, is_causal, scale, enable_gqa, dropout_p,
                                 dropout_keep)
    return (out64.detach(), grads64), (peer, peer_grads)


def assert_linear_relu_matches(y, x, w, b, grad=None, grads=None, what=""):
    """The house rule for bigmodel.linear_relu's output ``y`` and, when given, its gradients
    ``grads`` = {'x' | 'w' | 'b': tensor} for the upstream gradient ``grad``."""
    assert_fused_linear_matches(y, x, w, b, "relu", grad=grad, grads=grads, what=what)


def _arithmetic_scales(out64, grads64, q, k, v, grad, attn_mask, scale, enable_gqa):
    """(rms, max) sizes of what the kernels' fp32 arithmetic rounds, for the floors'
    ACCUMULATED_ULPS part (tolerances.check): the output times the largest |score| (exp(s - m)
    and exp(s - lse) are off by eps * |s|), and for the gradients also the dot products that the
    backward's D - dP cancels (scale * max |dO| . |V| * max |Q|, |K|), which are far larger than a
    gradient that cancels to 0 (one visible key: dq = dk = 0)."""
    q64, k64, v64, g64 = (t.detach().double() for t in (q, k, v, grad))
    if enable_gqa and k64.dim() >= 3 and q64.dim() >= 3 and k64.shape[-3] != q64.shape[-3]:
        k64, v64 = (t.repeat_interleave(q64.shape[-3] // t.shape[-3], dim=-3) for t in (k64, v64))
    s = 1.0 / math.sqrt(q64.shape[-1]) if scale is None else scale
    scores = (q64 @ k64.transpose(-2, -1)) * s
    if attn_mask is not None and attn_mask.is_floating_point():
        scores = scores + attn_mask.double()
    finite = scores[torch.isfinite(scores)]
    smax = max(1.0, finite.abs().max().item()) if finite.numel() else 1.0
    out = (rms(out64) * smax, magnitude(out64) * smax)
    if grads64 is None or not g64.numel() or not v64.numel():
        return out, None
    terms = (g64.abs() @ v64.abs().transpose(-2, -1)).max().item() * s * max(magnitude(q64), magnitude(k64))
    grads = (max(rms(g) for g in grads64) * smax + terms, max(magnitude(g) for g in grads64) * smax + terms)
    return out, grads


def assert_attention_matches(out, q, k, v, grad=None, grads=None, what="", rounds_operands=None, **kwargs):
    """The house rule for bigmodel.scaled_dot_product_attention's output ``out`` (and, when given,
    its (dq, dk, dv) ``grads`` for the upstream gradient ``grad``); ``kwargs`` are SDPA's.
    ``rounds_operands``: the path rounds P and dS to a 16-bit input dtype for its products (the
    Triton kernels, which CUDA tensors run; True for those by default): the floors then hold that
    rounding's error (rounded_operand_floors)."""
    rounds_operands = q.is_cuda if rounds_operands is None else rounds_operands
    upstream = torch.randn_like(out) if grad is None else grad
    (out64, grads64), (peer, peer_grads) = attention_truth_and_peer(q, k, v, upstream, **kwargs)
    assert out.shape == out64.shape and out.dtype == q.dtype, f"{what}: {tuple(out.shape)} {out.dtype}"
    acc_out, acc_grads = _arithmetic_scales(out64, grads64 if grads is not None else None, q, k, v, upstream,
                                            kwargs.get("attn_mask"), kwargs.get("scale"),
                                            kwargs.get("enable_gqa", False))
    rounded_out, rounded_grads = rounded_operand_floors(q, k, v, upstream, **kwargs) if rounds_operands else (None, None)
    assert_matches(out, peer, out64, FORWARD, f"{what} output", accumulated=acc_out, rounded=rounded_out)
    if grads is not None:
        assert_grads_match(grads, peer_grads, grads64, ["dq", "dk", "dv"], what, accumulated=acc_grads,
                           rounded=rounded_grads)


def fused_linear_truth_and_peer(x, w, b, grad, y, activation, negative_slope=0.01, approximate="none", pre=None):
    """((out64, grads64), (out_peer, grads_peer)) for bigmodel.fused_linear's output ``y``: the
    truth in float64, the peer torch's eager act(F.linear) in the inputs' dtype (its backward by
    autograd, as eager runs it). Where the derivative jumps (ReLU, LeakyReLU at 0) both take the
    branch the op took, for the reason linear_relu_grads gives: from ``y``, or for a negative
    slope (where y > 0 on both sides) from the op's own pre-activation ``pre`` when given."""
    kink = activation in ("relu", "leaky_relu")
    slope = 0.0 if activation == "relu" else negative_slope

    def run(dtype, truth=False):
        leaves = [None if t is None else t.detach().to(dtype).requires_grad_() for t in (x, w, b)]
        if truth and activation == "gelu" and approximate == "tanh":
            # The same function without torch's cancellation: 0.5 z (1 + tanh u) loses ~|z| eps
            # for z << 0 (float64 included, where the peer is this very formula), z sigmoid(2u)
            # does not; the truth must not carry the error it measures.
            z = F.linear(*leaves)
            out = z * torch.sigmoid(2 * math.sqrt(2 / math.pi) * (z + 0.044715 * z**3))
        else:
            out = ref_fused_linear(*leaves, activation, negative_slope, approximate)
        if not kink:
            live = [t for t in leaves if t is not None]
            got = list(torch.autograd.grad(out, live, grad.to(dtype))) + [None]
            return out.detach(), tuple(got[:3])
        n, k = w.shape
        m = math.prod(x.shape[:-1])
        if slope >= 0:
            positive = ~(y.detach() <= 0)
        else:  # a |z| below the sum's rounding error can take either side: take the op's
            positive = (pre if pre is not None else F.linear(*leaves)).detach().reshape(y.shape) > 0
        g = grad.detach().to(dtype)
        dz = torch.where(positive, g, g * slope).reshape(m, n)  # slope as a Python float: no fp32 rounding
        xs, ws = leaves[0].detach().reshape(m, k), leaves[1].detach()
        return out.detach(), ((dz @ ws).reshape(x.shape), dz.t() @ xs, dz.sum(0) if b is not None else None)

    return run(torch.float64, truth=True), run(x.dtype)


def assert_fused_linear_matches(y, x, w, b, activation, negative_slope=0.01, approximate="none", grad=None,
                                grads=None, what="", pre=None):
    """The house rule for bigmodel.fused_linear's output and, when given, its gradients
    ``grads`` = {'x' | 'w' | 'b': tensor} for the upstream gradient ``grad``; ``pre``: the op's
    pre-activation, which fixes the branch of LeakyReLU with a negative slope at z = 0."""
    (out64, grads64), (peer, peer_grads) = fused_linear_truth_and_peer(
        x, w, b, y if grad is None else grad, y, activation, negative_slope, approximate, pre)
    assert y.shape == out64.shape and y.dtype == x.dtype, f"{what}: {tuple(y.shape)} {y.dtype}"
    assert_matches(y, peer, out64, FORWARD, f"{what} forward")
    if grads:
        index = {"x": 0, "w": 1, "b": 2}
        # db with its own floor scale (_bias_grad_terms); dX and dW with their results' scales,
        # or where the derivative has a root, the scale of its terms (_input_grad_terms).
        upstream = y if grad is None else grad
        accumulated = {"b": _bias_grad_terms(upstream, activation, negative_slope)}
        for n in ("x", "w"):
            if n in grads:
                accumulated[n] = _input_grad_terms(upstream, x, w, activation, n, grads64[index[n]])
        for n in sorted(grads, key=index.get):
            assert_grads_match([grads[n]], [peer_grads[index[n]]], [grads64[index[n]]], [f"grad_{n}"], what,
                               accumulated=accumulated.get(n))


# The largest |act'(z)| of the activations fused_linear takes (GELU's derivative peaks at ~1.13,
# SiLU's at ~1.10; the others at 1, or LeakyReLU's |slope| where that is larger).
_MAX_DERIVATIVE = 1.13


# Activations whose derivative crosses zero inside the domain (GELU's at z ~ -0.75, SiLU's at
# -1.28): there dz is a difference of terms of ~0.2.
_DERIVATIVE_ROOTS = ("gelu", "silu")


def _input_grad_terms(grad, x, w, activation, name, result64):
    """(rms, max) floor scales for dX (name 'x') or dW ('w'): their results' own, or where the
    derivative has a root, the larger of those and the size of dz's terms carried through the
    product as independent errors, sqrt(|dz terms|^2 @ W^2) (dX) or sqrt(|dz terms|^2^T @ X^2)
    (dW), the terms bounded by |grad| times the largest |act'|. At a root a one-element gradient
    is off by an ulp of those terms in any correct kernel, while torch's own can happen to round
    to a hundredth of one (GELU at z = -0.7503: torch 4e-10, a kernel with the same formula in
    another order 2.8e-9; SiLU at -1.2755: 1.3e-10 against 4.6e-9). Elsewhere this scale is about
    the result's (random signs), so a 1e-5 relative error is still caught."""
    own = (rms(result64), magnitude(result64))
    if activation not in _DERIVATIVE_ROOTS:
        return own
    n, k = w.shape
    dz2 = (grad.detach().double().abs() * _MAX_DERIVATIVE).reshape(-1, n) ** 2
    if name == "x":
        terms = (dz2 @ w.detach().double() ** 2).sqrt()
    else:
        terms = (dz2.t() @ x.detach().double().reshape(-1, k) ** 2).sqrt()
    return max(own[0], rms(terms)), max(own[1], magnitude(terms))


def _bias_grad_terms(grad, activation, negative_slope):
    """(rms, max) of the column sums of |dz| (|dz| bounded by |grad| times the largest |act'|):
    the size of the terms db adds up, for the floors' ACCUMULATED_ULPS part (tolerances.check).
    With a single output feature db is one sum, and where its terms cancel (0.0034 from terms of
    ~0.5 over 7 rows) a kernel summing in another order than torch's is off by an ulp of the
    terms: on the result's own scale that failed though both sums were right (torch's error
    happened to be 0). dX and dW keep their results' scales: their largest element, which sets
    the floor, does not cancel."""
    slope = abs(negative_slope) if activation == "leaky_relu" else 0.0
    dz = grad.detach().double().abs() * (_MAX_DERIVATIVE * max(1.0, slope))
    sums = dz.reshape(-1, dz.shape[-1]).sum(0) if dz.dim() else dz
    return rms(sums), magnitude(sums)
