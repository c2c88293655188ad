"""Speed check of the C++ CPU attention engine against torch's CPU SDPA (fp32).

Calls alternate between the two in one process and the medians are compared, so a machine
shared with other work still gives fair ratios. A large fp32 torch.mm is timed in the same
rotation: the machine's GEMM rate under the same conditions, and the fraction of it the
attention reaches.

    python bench/cpu_attention_check.py [--reps 15] [--threads N]

FLOPs: forward 4*B*H*L*S*D (halved when causal), backward 2.5x the forward.
"""
import argparse
import statistics
import time

import torch
import torch.nn.functional as F

import bigmodel  # noqa: F401  (loads the C++ engine: torch.ops.bigmodel.*)

CASES = [  # (mode, B, H, L, D, causal)
    ("fwd", 2, 8, 1024, 64, False),
    ("fwd", 2, 8, 1024, 64, True),
    ("fwd", 1, 4, 2048, 128, False),
    ("fwd+bwd", 2, 8, 512, 64, True),
]


def _time(fn):
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def gemm_fn(n=1536):
    """A large fp32 torch.mm and its FLOPs: the machine's practical GEMM rate."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    return (lambda: torch.mm(a, b)), 2 * n**3


def make_fns(mode, B, H, L, D, causal):
    q, k, v = (torch.randn(B, H, L, D) for _ in range(3))
    scale = D**-0.5
    if mode == "fwd":
        def ours():
            torch.ops.bigmodel.attention(q, k, v, None, 0.0, causal, scale, None)

        def ref():
            F.scaled_dot_product_attention(q, k, v, is_causal=causal)
        return ours, ref
    g = torch.randn(B, H, L, D)
    qr, kr, vr = (t.clone().requires_grad_() for t in (q, k, v))

    def ours():
        o, lse = torch.ops.bigmodel.attention(q, k, v, None, 0.0, causal, scale, None)
        torch.ops.bigmodel.attention_backward(g, q, k, v, o, lse, None, 0.0, causal, scale, None)

    def ref():
        out = F.scaled_dot_product_attention(qr, kr, vr, is_causal=causal)
        torch.autograd.grad(out, (qr, kr, vr), g)
    return ours, ref


def flops(mode, B, H, L, D, causal):
    f = 4 * B * H * L * L * D * (0.5 if causal else 1.0)
    return f * 3.5 if mode == "fwd+bwd" else f


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--reps", type=int, default=15)
    p.add_argument("--threads", type=int, default=None)
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    mm, mm_flops = gemm_fn()
    mm()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"capability {torch.backends.cpu.get_cpu_capability()}")
    print(f"{'case':42s} {'ours ms':>9s} {'torch ms':>9s} {'speedup':>8s} {'GFLOP/s':>8s} "
          f"{'GEMM GF/s':>10s} {'of GEMM':>8s}")
    for case in CASES:
        ours, ref = make_fns(*case)
        ours(), ref()
        to, tr, tm = [], [], []
        for _ in range(args.reps):  # interleaved: all three see the same machine state
            to.append(_time(ours))
            tr.append(_time(ref))
            tm.append(_time(mm))
        mo, mr = statistics.median(to), statistics.median(tr)
        rate = mm_flops / statistics.median(tm) / 1e9
        gf = flops(*case) / mo / 1e9
        mode, B, H, L, D, causal = case
        name = f"{mode} B={B} H={H} L={L} D={D}{' causal' if causal else ''}"
        print(f"{name:42s} {mo * 1e3:9.2f} {mr * 1e3:9.2f} {mr / mo:7.2f}x {gf:8.1f} {rate:10.1f} "
              f"{gf / rate:7.0%}")


if __name__ == "__main__":
    main()
