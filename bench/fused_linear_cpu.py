"""bigmodel.fused_linear against eager act(F.linear(x, w, b)) on CPU, per activation, fp32.

    PYTHONPATH=. python -m bench.fused_linear_cpu [--threads 2] [--reps 9]

Run it once per CPU level, the caps in the environment before torch loads (bench/cpu_level.py):
    ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2 MKL_ENABLE_INSTRUCTIONS=AVX2 python -m ...

Both providers run in one process, interleaved call by call on the same inputs, so the load of
a shared machine falls on both alike. Ratios are eager's time over bigmodel's (above 1.00x
bigmodel is faster), of the medians and of the minima (each side's least disturbed call). fwd
runs under no_grad; fwd+bwd adds autograd.grad for x, w and b.
"""
import argparse
import statistics
import time

import torch
import torch.nn.functional as F

import bigmodel

SHAPES = [(4096, 784, 512), (16384, 256, 1024)]
SLOPE = 0.01
# (label, bigmodel.fused_linear's activation and approximate, eager's activation)
ACTIVATIONS = [
    ("none", (None, "none"), lambda z: z),
    ("relu", ("relu", "none"), F.relu),
    ("leaky_relu", ("leaky_relu", "none"), lambda z: F.leaky_relu(z, SLOPE)),
    ("gelu", ("gelu", "none"), F.gelu),
    ("gelu_tanh", ("gelu", "tanh"), lambda z: F.gelu(z, approximate="tanh")),
    ("silu", ("silu", "none"), F.silu),
    ("tanh", ("tanh", "none"), torch.tanh),
    ("sigmoid", ("sigmoid", "none"), torch.sigmoid),
]


def _call(fn, mode, x, w, b, grad):
    if mode == "fwd":
        with torch.no_grad():
            return fn(x, w, b)
    y = fn(x, w, b)
    return torch.autograd.grad(y, (x, w, b), grad)


def measure(shape, act, mode, reps):
    m, k, n = shape
    label, (name, approx), eager_act = act
    x = torch.randn(m, k).requires_grad_()
    w = (torch.randn(n, k) / k**0.5).requires_grad_()
    b = torch.randn(n).requires_grad_()
    grad = torch.randn(m, n)
    providers = {
        "eager": lambda x, w, b: eager_act(F.linear(x, w, b)),
        "bigmodel": lambda x, w, b: bigmodel.fused_linear(x, w, b, name, SLOPE, approx),
    }
    times = {p: [] for p in providers}
    for p, fn in providers.items():  # warm-up: first-call costs (oneDNN's JIT, page faults)
        _call(fn, mode, x, w, b, grad)
    for _ in range(reps):
        for p, fn in providers.items():
            t0 = time.perf_counter()
            _call(fn, mode, x, w, b, grad)
            times[p].append(time.perf_counter() - t0)
    return {p: (statistics.median(t) * 1e3, min(t) * 1e3) for p, t in times.items()}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--reps", type=int, default=9)
    parser.add_argument("--modes", default="fwd,fwd+bwd")
    parser.add_argument("--only", default="", help="comma-separated activation labels")
    parser.add_argument("--shapes", default="", help="comma-separated MxK->N, e.g. 16384x256->1024")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    acts = [a for a in ACTIVATIONS if not args.only or a[0] in args.only.split(",")]
    print(f"# level {torch.backends.cpu.get_cpu_capability()}, {args.threads} threads, median of {args.reps}")
    print("| shape | mode | activation | eager ms | bigmodel ms | ratio (medians) | ratio (minima) |")
    print("|---|---|---|---|---|---|---|")
    shapes = SHAPES if not args.shapes else [
        tuple(int(v) for v in s.replace("->", "x").split("x")) for s in args.shapes.split(",")]
    for shape in shapes:
        for mode in args.modes.split(","):
            for act in acts:
                t = measure(shape, act, mode, args.reps)
                (eager, eager_min), (ours, ours_min) = t["eager"], t["bigmodel"]
                m, k, n = shape
                print(f"| {m}x{k}->{n} | {mode} | {act[0]} | {eager:.2f} | {ours:.2f} | {eager / ours:.2f}x "
                      f"| {eager_min / ours_min:.2f}x |", flush=True)


if __name__ == "__main__":
    main()
