"""attention cases: softmax(Q K^T / sqrt(D) [+ causal mask]) V, q/k/v of shape (B, H, L, D).

FLOPs as FlashAttention counts them: forward 4*B*H*L*S*D (two GEMMs), halved when causal;
backward 2.5x the forward (five GEMMs, one of them recomputing the scores); fwd+bwd 3.5x.
Minimum bytes: forward reads q, k, v and writes o; backward reads q, k, v, o, dO and the
fp32 row statistics (B*H*L) and writes dq, dk, dv.
"""
import math

import torch
import torch.nn.functional as F

import bigmodel
from bench.core import Case, Provider, bigmodel_backends, compile_modes, op_provider, randn, skipped_provider

OP = "attention"


def flops(B, H, L, S, D, causal, mode):
    fwd = 4.0 * B * H * L * S * D / (2 if causal else 1)
    return {"fwd": fwd, "bwd": 2.5 * fwd, "fwd+bwd": 3.5 * fwd}[mode]


def min_bytes(B, H, L, S, D, mode, elt):
    fwd = elt * B * H * (2 * L * D + 2 * S * D)
    bwd = elt * B * H * (4 * L * D + 4 * S * D) + 4 * B * H * L
    return {"fwd": fwd, "bwd": bwd, "fwd+bwd": fwd + bwd}[mode]


def _math(q, k, v, causal):
    """Attention written out as a user would without SDPA (what torch.compile is given)."""
    scores = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(q.shape[-1]))
    if causal:
        L, S = scores.shape[-2:]
        hidden = torch.ones(L, S, dtype=torch.bool, device=q.device).triu(1)
        scores = scores.masked_fill(hidden, float("-inf"))
    return torch.softmax(scores.float(), dim=-1).to(q.dtype) @ v


def _materialises(name, B, H, L, S, device):
    """Providers that build the (L, S) scores in memory run only while those stay modest."""
    limit = 2**28 if device.type == "cuda" else 2**26
    if B * H * L * S > limit:
        return skipped_provider(name, f"materialises B*H*L*S = {B * H * L * S:.3g} scores (limit {limit:.3g})")
    return None


def _providers(B, H, L, S, causal, mode, device, quick):
    out = []
    for name in [b for b in bigmodel_backends(device) if b != "cublaslt"]:  # cuBLASLt: linear_relu only
        ctx = lambda name=name: bigmodel.use_backend(name)  # noqa: E731
        fwd = lambda q, k, v: bigmodel.scaled_dot_product_attention(q, k, v, is_causal=causal)  # noqa: E731
        pname = f"bigmodel-{name}"
        out.append((name == "reference" and _materialises(pname, B, H, L, S, device))
                   or op_provider(pname, fwd, mode, ctx))

    sdpa = lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=causal)  # noqa: E731
    if device.type == "cuda":
        from torch.nn.attention import SDPBackend, sdpa_kernel

        for tag, kind in (("flash", "FLASH_ATTENTION"), ("efficient", "EFFICIENT_ATTENTION"),
                          ("cudnn", "CUDNN_ATTENTION"), ("math", "MATH")):
            name = f"torch-sdpa-{tag}"
            if not hasattr(SDPBackend, kind):
                out.append(skipped_provider(name, f"no SDPBackend.{kind}"))
                continue
            ctx = lambda kind=kind: sdpa_kernel([getattr(SDPBackend, kind)])  # noqa: E731
            out.append((tag == "math" and _materialises(name, B, H, L, S, device))
                       or op_provider(name, sdpa, mode, ctx))
    else:
        out.append(op_provider("torch-sdpa", sdpa, mode))

    for name, cmode in compile_modes(device, quick):
        capped = _materialises(name, B, H, L, S, device)
        out.append(capped or _compiled(name, cmode, causal, mode))
    return out


def _compiled(name, cmode, causal, mode):
    def setup(inputs, seed):
        fn = torch.compile(lambda q, k, v: _math(q, k, v, causal), mode=cmode, dynamic=False)
        return op_provider(name, fn, mode).setup(inputs, seed)

    return Provider(name, setup)


def case(B, H, L, D, causal, mode, dtype, device, quick=False, family="", x_key=None):
    S = L
    elt = torch.finfo(dtype).bits // 8
    grad = mode != "fwd"

    def inputs(seed):
        return [randn((B, H, L, D), dtype, device, seed + i, grad) for i in range(3)]

    shape = {"B": B, "H": H, "L": L, "S": S, "D": D, "causal": int(causal)}
    return Case(OP, mode, dtype, shape, device, flops(B, H, L, S, D, causal, mode),
                min_bytes(B, H, L, S, D, mode, elt), inputs,
                _providers(B, H, L, S, causal, mode, device, quick), family=family, x_key=x_key,
                input_bytes=3 * elt * B * H * L * D)


# Issue 4's and 11's CPU targets and issue 8's H200 targets: (B, H, L, D, causal, modes
# --quick measures; a full run measures every mode of them).
ISSUE_CPU = [(2, 8, 1024, 64, False, ("fwd",)), (2, 8, 1024, 64, True, ("fwd",)),
             (1, 4, 2048, 128, False, ("fwd",)), (4, 8, 512, 64, False, ("fwd",)),
             (2, 8, 512, 64, True, ("fwd+bwd",))]
ISSUE_GPU = [(2, 16, 8192, 128, False, ("fwd", "fwd+bwd")), (2, 16, 8192, 128, True, ("fwd", "fwd+bwd")),
             (4, 32, 4096, 64, False, ("fwd", "fwd+bwd"))]


def cases(device, modes, dtypes, quick=False):
    """The sweep: B*L tokens and H*D fixed (16k and 2048 on GPU, 2048 and 512 on CPU, so the
    work per length stays comparable), L from 512 to 16k on GPU and 256 to 4k on CPU, D 64
    and 128, causal and not; plus the issues' target shapes."""
    gpu = device.type == "cuda"
    tokens, width = (16384, 2048) if gpu else (2048, 512)
    if gpu:
        lengths = [2048, 8192, 16384] if quick else [512, 1024, 2048, 4096, 8192, 16384]
    else:
        lengths = [512, 1024, 2048] if quick else [256, 512, 1024, 2048, 4096]
    dims = [128] if (quick and gpu) else [64] if quick else [64, 128]
    points = []  # (B, H, L, D, causal, modes, family); the sweep first, so it keeps its lines
    for D in dims:
        for causal in (False, True):
            fam = f"D={D} causal={int(causal)}"
            for L in lengths:
                points.append((max(1, tokens // L), width // D, L, D, causal, list(modes), fam))
    for B, H, L, D, causal, only in (ISSUE_GPU if gpu else ISSUE_CPU):
        points.append((B, H, L, D, causal, [m for m in modes if m in only or not (quick or gpu)], "issue"))
    seen = {}
    for B, H, L, D, causal, ms, fam in points:
        for dtype in dtypes:
            for mode in ms:
                key = (B, H, L, D, causal, dtype, mode)
                if key not in seen:
                    seen[key] = case(B, H, L, D, causal, mode, dtype, device, quick, fam,
                                     None if fam == "issue" else "L")
                seen[key].priority |= fam == "issue"
    return list(seen.values())
