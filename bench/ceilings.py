"""The limits, measured in the same run as everything else: a large matmul's TFLOP/s and a
large copy's GB/s per dtype. They are ordinary cases (ops ``ceiling_matmul`` and
``ceiling_copy``), so they land in the CSV beside the rows they bound, and the summary
reports every row as a percentage of them.
"""
import torch

from bench import cpu_level
from bench.core import Case, Provider, randn, skipped_provider


def _matmul_case(device, dtype, n):
    def inputs(seed):
        return [randn((n, n), dtype, device, seed), randn((n, n), dtype, device, seed + 1),
                torch.empty((n, n), dtype=dtype, device=device)]

    def setup(inp, seed):
        a, b, c = inp
        fn = lambda: torch.mm(a, b, out=c)  # noqa: E731
        fn()
        return fn

    def setup_onednn(inp, seed):
        a, b, _ = inp
        bt = b.t()
        fn = lambda: torch.ops.mkldnn._linear_pointwise(a, bt, None, "none", [], "")  # noqa: E731
        fn()
        return fn

    def setup_convert(inp, seed):
        a, b, _ = inp
        bt = b.t()
        fn = lambda: torch.mm(a.float(), bt.float().t()).to(dtype)  # noqa: E731
        fn()
        return fn

    providers = [Provider("torch-mm", setup)]
    cpu16 = device.type == "cpu" and dtype == torch.bfloat16
    if cpu16 and not cpu_level.native_bf16():
        # Without bf16 arithmetic torch.mm in bf16 is ATen's scalar loop (under 1 GFLOP/s; one
        # 2048^3 call takes half a minute): what bf16 can reach here is fp32 GEMM speed after
        # converting, so that is the ceiling.
        providers = [skipped_provider("torch-mm", "bf16 not native on this CPU/level: torch.mm runs "
                                      "a scalar loop (not timed)"), Provider("convert-mm", setup_convert)]
    # On CPU torch.mm is MKL, whose sgemm runs AVX2 code on AMD parts: oneDNN's JIT GEMM (what
    # bigmodel's fp32 engine calls) reaches 2.1x it there, so the ceiling is the faster of the two.
    # In bf16 oneDNN is the path wherever it supports bf16 (it converts on AVX-512 without it).
    onednn = torch.backends.mkldnn.is_available() and (
        dtype == torch.float32 or (cpu16 and torch.ops.mkldnn._is_mkldnn_bf16_supported()))
    if device.type == "cpu" and onednn:
        providers.append(Provider("onednn-mm", setup_onednn))
    elt = torch.finfo(dtype).bits // 8
    return Case("ceiling_matmul", "fwd", dtype, {"M": n, "K": n, "N": n}, device,
                flops=2.0 * n**3, bytes=3.0 * n * n * elt, make_inputs=inputs,
                providers=providers, input_bytes=3 * n * n * elt)


def _copy_case(device, dtype, nbytes):
    elt = torch.finfo(dtype).bits // 8
    numel = nbytes // elt

    def inputs(seed):
        return [randn((numel,), dtype, device, seed), torch.empty(numel, dtype=dtype, device=device)]

    def setup(inp, seed):
        src, dst = inp
        fn = lambda: dst.copy_(src)  # noqa: E731
        fn()
        return fn

    return Case("ceiling_copy", "fwd", dtype, {"bytes": numel * elt}, device, flops=0.0,
                bytes=2.0 * numel * elt, make_inputs=inputs,
                providers=[Provider("torch-copy", setup)], input_bytes=2 * numel * elt)


def cases(device, dtypes, tiny=False):
    """One matmul and one copy per dtype: 8192^3 and 1 GiB on GPU, 2048^3 and 256 MiB on CPU
    (both well past the caches); ``tiny`` (the smoke test) 128^3 and 1 MiB."""
    n = 128 if tiny else 8192 if device.type == "cuda" else 2048
    nbytes = 2**20 if tiny else 2**30 if device.type == "cuda" else 256 * 2**20
    out = []
    for dtype in dtypes:
        out += [_matmul_case(device, dtype, n), _copy_case(device, dtype, nbytes)]
    return out
