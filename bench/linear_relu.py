"""linear_relu cases: y = relu(x W^T + b) with x (M, K), W (N, K), b (N,).

FLOPs: 2*M*N*K forward (the bias and ReLU are M*N each, not counted), backward 2x that
(dX and dW). Minimum bytes: forward reads x, W, b and writes y; backward reads dY, y (the
mask), x, W and writes dX, dW, db.
"""
import torch
import torch.nn.functional as F

import bigmodel
from bench.core import Case, Provider, bigmodel_backends, compile_modes, op_provider, randn

OP = "linear_relu"


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


def _providers(device, mode, quick):
    out = []
    for name in bigmodel_backends(device):
        ctx = lambda name=name: bigmodel.use_backend(name)  # noqa: E731
        out.append(op_provider(f"bigmodel-{name}", bigmodel.linear_relu, mode, ctx))
    out.append(op_provider("torch-eager", _eager, mode))
    if mode == "fwd":  # it has no autograd formula
        out.append(op_provider("torch-addmm_act", _addmm_act, mode))
        out.append(Provider("bound-addmm", _bound_addmm))
    for name, cmode in compile_modes(device, quick):
        out.append(_compiled(name, cmode, mode))
    return out


def _compiled(name, cmode, mode):
    def setup(inputs, seed):
        fn = torch.compile(_eager, mode=cmode, dynamic=False)
        return op_provider(name, fn, mode).setup(inputs, seed)

    return Provider(name, setup)


def case(M, K, N, mode, dtype, device, quick=False, family="", x_key=None):
    elt = torch.finfo(dtype).bits // 8
    grad = mode != "fwd"

    def inputs(seed):
        # Scaled as nn.Linear initialises, so outputs stay O(1) in every dtype.
        return [randn((M, K), dtype, device, seed, grad),
                randn((N, K), dtype, device, seed + 1, grad, scale=K**-0.5),
                randn((N,), dtype, device, seed + 2, grad, scale=0.1)]

    return Case(OP, mode, dtype, {"M": M, "K": K, "N": N}, device, flops(M, K, N, mode),
                min_bytes(M, K, N, mode, elt), inputs, _providers(device, mode, quick),
                family=family, x_key=x_key, input_bytes=elt * (M * K + N * K + N))


# The shapes issue 2 and issue 8 name, measured in every run that includes this op.
ISSUE_SHAPES_CPU = [(65536, 128, 128), (16384, 256, 256), (4096, 784, 512), (256, 784, 512)]
ISSUE_SHAPES_GPU = ISSUE_SHAPES_CPU + [(8192, 8192, 8192), (65536, 256, 1024)]
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


def cases(device, modes, dtypes, quick=False):
    seen = {}
    for family, x_key, group in shapes(device, quick):
        for M, K, N in group:
            for dtype in dtypes:
                for mode in modes:
                    key = (M, K, N, dtype, mode)
                    if key not in seen:
                        seen[key] = case(M, K, N, mode, dtype, device, quick, family, x_key)
                    seen[key].priority |= family == "issue"
    return list(seen.values())

