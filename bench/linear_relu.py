"""The linear + activation family: y = act(x W^T + b) with x (M, K), W (N, K), b (N,).

One row of ``OPS`` per fused op (linear_relu, and fused_linear's GELU, SiLU, Tanh, Sigmoid and
LeakyReLU): the CSV's op name, bigmodel's function,
the same in plain torch (torch-eager, and what torch.compile is given) and torch's own fused
form where it has one. Adding an activation's rows is one entry there (and its shapes, if
they differ, in ``shapes``); every entry gets the same sweep, providers and bounds.

FLOPs: 2*M*N*K forward (the bias and activation are M*N each, not counted), backward 2x that
(dX and dW). Minimum bytes: forward reads x, W, b and writes y; backward reads dY, y (the
mask), x, W and writes dX, dW, db.
"""
import dataclasses
from typing import Callable, Optional

import torch
import torch.nn.functional as F

import bigmodel
from bench.core import Case, Provider, bigmodel_backends, compile_modes, op_provider, randn


def flops(M, K, N, mode):
    fwd = 2.0 * M * N * K
    return {"fwd": fwd, "bwd": 2 * fwd, "fwd+bwd": 3 * fwd}[mode]


def min_bytes(M, K, N, mode, elt):
    fwd = M * K + N * K + N + M * N
    bwd = 2 * M * N + M * K + N * K + M * K + N * K + N
    return elt * {"fwd": fwd, "bwd": bwd, "fwd+bwd": fwd + bwd}[mode]


def _eager(x, w, b):
    return F.relu(F.linear(x, w, b))


def _addmm_act(x, w, b):
    # The cuBLASLt / mkldnn epilogue torch itself has; no autograd formula (fwd rows only).
    return torch._addmm_activation(b, x, w.t())


@dataclasses.dataclass(frozen=True)
class LinearAct:
    """One fused linear + activation op as the bench measures it (all take (x, w, b))."""

    op: str  # the CSV's op name
    bigmodel: Callable  # bigmodel's public function, run under each backend
    eager: Callable  # the same in plain torch: torch-eager, and torch.compile's input
    torch_fused: Optional[Callable] = None  # torch's own fused form (torch-addmm_act; fwd only)


def _fused(activation, op=None, **kw):
    # bigmodel.fused_linear with one activation, and its eager twin act(F.linear(x, W, b)).
    torch_act = {"gelu": F.gelu, "silu": F.silu, "tanh": torch.tanh, "sigmoid": torch.sigmoid,
                 "leaky_relu": F.leaky_relu}[activation]

    def ours(x, w, b):
        return bigmodel.fused_linear(x, w, b, activation, **kw)

    def eager(x, w, b):
        return torch_act(F.linear(x, w, b), **kw)

    return LinearAct(op or f"linear_{activation}", ours, eager)


OPS = {"linear_relu": LinearAct("linear_relu", bigmodel.linear_relu, _eager, _addmm_act),
       **{f"linear_{a}": _fused(a) for a in ("gelu", "silu", "tanh", "sigmoid", "leaky_relu")},
       # GELU's tanh approximation: the one cuBLASLt fuses (GELU_AUX_BIAS); GPU runs only, the
       # CPU engine's GELU rows are linear_gelu's.
       "linear_gelu_tanh": _fused("gelu", "linear_gelu_tanh", approximate="tanh")}
OP = "linear_relu"
GPU_ONLY = ("linear_gelu_tanh",)
# The ops the 'cublaslt' backend runs (bigmodel.backend): ReLU, and GELU's tanh approximation.
CUBLASLT_OPS = ("linear_relu", "linear_gelu_tanh")
# The rest of the family (bigmodel.fused_linear) on issue 14's shapes only: the seed MLP layer
# at a large batch and a Transformer FFN up-projection; their GEMMs are linear_relu's sweep.
FUSED_SHAPES = [(4096, 784, 512), (16384, 256, 1024)]


def _bound_addmm(inputs, seed):
    """Not a contender: the GEMM with its bias into a preallocated output and no ReLU, the time
    a fused kernel is measured against ("bias and ReLU for free")."""
    x, w, b = inputs
    out = torch.empty(x.shape[0], w.shape[0], dtype=x.dtype, device=x.device)

    def run():
        with torch.no_grad():
            return torch.addmm(b, x, w.t(), out=out)

    run()
    return run


def _providers(spec, device, mode, quick):
    out = []
    for name in bigmodel_backends(device):
        if name == "cublaslt" and spec.op not in CUBLASLT_OPS:
            continue  # no cuBLASLt epilogue for this activation: the backend raises for it
        ctx = lambda name=name: bigmodel.use_backend(name)  # noqa: E731
        out.append(op_provider(f"bigmodel-{name}", spec.bigmodel, mode, ctx))
    out.append(op_provider("torch-eager", spec.eager, mode))
    if mode == "fwd":  # no autograd formula for torch's fused form; the bound is a forward
        if spec.torch_fused is not None:
            out.append(op_provider("torch-addmm_act", spec.torch_fused, mode))
        out.append(Provider("bound-addmm", _bound_addmm))
    for name, cmode in compile_modes(device, quick):
        out.append(_compiled(name, cmode, spec.eager, mode))
    return out


def _compiled(name, cmode, eager, mode):
    def setup(inputs, seed):
        fn = torch.compile(eager, mode=cmode, dynamic=False)
        return op_provider(name, fn, mode).setup(inputs, seed)

    return Provider(name, setup)


def case(M, K, N, mode, dtype, device, quick=False, family="", x_key=None, op=OP):
    elt = torch.finfo(dtype).bits // 8
    grad = mode != "fwd"

    def inputs(seed):
        # Scaled as nn.Linear initialises, so outputs stay O(1) in every dtype.
        return [randn((M, K), dtype, device, seed, grad),
                randn((N, K), dtype, device, seed + 1, grad, scale=K**-0.5),
                randn((N,), dtype, device, seed + 2, grad, scale=0.1)]

    return Case(op, mode, dtype, {"M": M, "K": K, "N": N}, device, flops(M, K, N, mode),
                min_bytes(M, K, N, mode, elt), inputs, _providers(OPS[op], device, mode, quick),
                family=family, x_key=x_key, input_bytes=elt * (M * K + N * K + N))


# The shapes issues 2, 8 and 11 name, measured in every run that includes this op.
ISSUE_SHAPES_CPU = [(65536, 128, 128), (16384, 256, 256), (4096, 784, 512), (256, 784, 512),
                    (1024, 784, 512), (1024, 256, 10)]
ISSUE_SHAPES_GPU = ISSUE_SHAPES_CPU[:4] + [(8192, 8192, 8192), (65536, 256, 1024)]
SEED_LAYERS = [(784, 512), (512, 256), (256, 10)]  # the seed's MLP


def shapes(device, quick):
    """(family, x_key, [(M, K, N)]) groups for this device."""
    gpu = device.type == "cuda"
    groups = []
    if gpu:
        batches = [1024, 65536] if quick else [256, 1024, 4096, 16384, 65536]
    else:
        batches = [256, 1024, 4096] if quick else [64, 256, 1024, 4096]
    for i, (k, n) in enumerate(SEED_LAYERS):
        # --quick: the batch sweep on the first (largest) layer only.
        ms = batches if (not quick or i == 0) else batches[-1:] if gpu else [1024]
        groups.append((f"seed MLP {k}->{n}", "M", [(m, k, n) for m in ms]))
    sizes = ([2048, 4096, 8192] if quick else [1024, 2048, 4096, 8192]) if gpu else \
            ([256, 512, 1024] if quick else [256, 512, 1024, 2048])
    groups.append(("square", "N", [(n, n, n) for n in sizes]))
    # Transformer FFN up-projection (d -> 4d, the Linear+ReLU half) at a fixed token count.
    tokens = 16384 if gpu else 2048
    dims = ([4096] if quick else [1024, 2048, 4096]) if gpu else ([256] if quick else [256, 512, 1024])
    groups.append(("FFN d->4d", "K", [(tokens, d, 4 * d) for d in dims]))
    # Last, so a shape that is also a sweep point stays on its sweep's line.
    groups.append(("issue", None, ISSUE_SHAPES_GPU if gpu else ISSUE_SHAPES_CPU))
    return groups


def cases(device, modes, dtypes, quick=False, ops=(OP,)):
    """The sweep of ``shapes`` for each op of ``OPS`` named in ``ops``."""
    seen = {}
    for op in (o for o in OPS if o in ops and (device.type == "cuda" or o not in GPU_ONLY)):
        groups = shapes(device, quick) if op == OP else [("issue", None, FUSED_SHAPES)]
        for family, x_key, group in groups:
            for M, K, N in group:
                for dtype in dtypes:
                    for mode in modes:
                        key = (op, M, K, N, dtype, mode)
                        if key not in seen:
                            seen[key] = case(M, K, N, mode, dtype, device, quick, family, x_key, op)
                        seen[key].priority |= family == "issue"
    return list(seen.values())

