"""python -m bench.picks: what the autotuners choose on the GPU, beside each choice's static facts.

For the issues' GPU target shapes (bench/targets.py), in order of importance, it runs each op
once forward and backward with autotuning on and reads every Triton kernel's measured configs:
the pick, its time and TFLOP/s, the runner-up's time, and the best config of the other family
(plain pointer kernels vs Hopper TMA variants), each with its registers, spills, shared memory
and CTAs/SM from bench/results/sm90_static.md. A spill or a wrong pick shows at once. The
compiled kernels and the autotuning choices land in Triton's on-disk caches
(TRITON_CACHE_AUTOTUNING=1, as bench/device_check.sh sets), so the stages after it reuse them.

    python -m bench.picks [--time-limit S] [--out FILE]     on the GPU
    python -m bench.picks --dry-run                          the candidates per shape, no timings
"""
import argparse
import os
import sys
import time

import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STATIC = os.path.join(REPO, "bench", "results", "sm90_static.md")

# (op, shape, causal): most important first; a case starts only while time is left.
CASES = [
    ("attention", dict(B=2, H=16, L=8192, S=8192, D=128), False),
    ("linear_relu", dict(M=8192, K=8192, N=8192), None),
    ("attention", dict(B=2, H=16, L=8192, S=8192, D=128), True),
    ("attention", dict(B=4, H=32, L=4096, S=4096, D=64), False),
    ("linear_relu", dict(M=65536, K=256, N=1024), None),
]
DTYPE = torch.bfloat16


def read_static(path=STATIC):
    """{(op, kernel, variant, tile, warps, stages, dtype, d): row dict} from the committed table."""
    if not os.path.exists(path):
        return {}
    rows = {}
    header = None
    with open(path) as f:
        for line in f:
            if not line.startswith("|") or line.startswith("|---"):
                continue
            cells = [c.strip() for c in line.strip().strip("|").split("|")]
            if header is None:
                header = cells
                continue
            row = dict(zip(header, cells))
            rows[(row["op"], row["kernel"], row["variant"], row["tile"], row["warps"], row["stages"], row["dtype"],
                  row["d"])] = row
    return rows


def _variant(config):
    k = config.kwargs
    return "tma+ws" if k.get("WS") else "tma" if k.get("TMA") else "plain"


def _tile(config):
    k = config.kwargs
    return "x".join(str(k[n]) for n in ("BLOCK_M", "BLOCK_N", "BLOCK_K") if n in k)


def describe(config):
    return f"{_variant(config)} {_tile(config)} w{config.num_warps} s{config.num_stages}"


def static_of(static, op, kernel, config, d):
    row = static.get((op, kernel, _variant(config), _tile(config), str(config.num_warps), str(config.num_stages),
                      "bf16", str(d) if d else ""))
    if row is None:
        return "not in the static table"
    return (f"regs {row['regs']}, spill {row['spill B (st/ld)']}, smem {row['smem KB']} KB, "
            f"{row['CTAs/SM']} CTA/SM")


def _kernels(op):
    if op == "attention":
        from bigmodel.kernels import attention as A

        return [("fwd", A._attention_fwd_kernel), ("dkdv", A._attention_bwd_dkdv_kernel),
                ("dq", A._attention_bwd_dq_kernel)]
    from bigmodel.kernels import linear_relu as LR

    return [("fwd", LR._linear_relu_fwd_kernel), ("dx", LR._linear_relu_bwd_dx_kernel),
            ("dw", LR._linear_relu_bwd_dw_kernel)]


def kernel_flops(op, kernel, shape, causal):
    """FLOPs of one kernel's launch: attention's forward 2 GEMMs, dK/dV 4, dQ 3 (of 2*L*S*D each,
    halved when causal); each of linear_relu's kernels one GEMM."""
    if op == "linear_relu":
        return 2.0 * shape["M"] * shape["N"] * shape["K"]
    gemm = 2.0 * shape["B"] * shape["H"] * shape["L"] * shape["S"] * shape["D"] / (2 if causal else 1)
    return {"fwd": 2, "dkdv": 4, "dq": 3}[kernel] * gemm


def _run_once(op, shape, causal, device):
    import bigmodel

    torch.manual_seed(0)
    if op == "attention":
        q, k, v = (torch.randn(shape["B"], shape["H"], shape["L"], shape["D"], device=device, dtype=DTYPE,
                               requires_grad=True) for _ in range(3))
        out = bigmodel.scaled_dot_product_attention(q, k, v, is_causal=causal)
    else:
        x = torch.randn(shape["M"], shape["K"], device=device, dtype=DTYPE, requires_grad=True)
        w = (torch.randn(shape["N"], shape["K"], device=device, dtype=DTYPE) / shape["K"] ** 0.5).requires_grad_()
        b = torch.randn(shape["N"], device=device, dtype=DTYPE, requires_grad=True)
        out = bigmodel.linear_relu(x, w, b)
    out.backward(torch.randn_like(out))
    torch.cuda.synchronize()


def measure(op, shape, causal, static, device):
    """Table lines for one case: per kernel the pick, the runner-up and the other family's best."""
    _run_once(op, shape, causal, device)
    lines = []
    d = shape.get("D")
    for kernel, tuner in _kernels(op):
        timings = {c: t[0] if isinstance(t, (list, tuple)) else t
                   for c, t in (getattr(tuner, "configs_timings", None) or {}).items()}
        if not timings:
            lines.append(f"| {op} | {kernel} | {_shape(shape, causal)} | one config ran: "
                         f"{describe(tuner.best_config)} | | | | | |")
            continue
        ranked = sorted(timings, key=timings.get)
        pick = ranked[0]
        second = ranked[1] if len(ranked) > 1 else None
        other = next((c for c in ranked if (c.kwargs.get("TMA", False) != pick.kwargs.get("TMA", False))), None)
        flops = kernel_flops(op, kernel, shape, causal)

        def cell(c):
            return "-" if c is None else f"{describe(c)}: {timings[c]:.3f} ms, {flops / timings[c] / 1e9:.0f} TFLOP/s"

        lines.append(f"| {op} | {kernel} | {_shape(shape, causal)} | {cell(pick)} | "
                     f"{static_of(static, op, kernel, pick, d)} | {cell(second)} | {cell(other)} | "
                     f"{static_of(static, op, kernel, other, d) if other else ''} | {len(ranked)} |")
    return lines


def candidates(op, shape, static):
    """Dry run: the configs each kernel's pruner offers for the case on sm_90 (no GPU needed)."""
    d = shape.get("D")
    lines = []
    if op == "attention":
        from bigmodel.kernels import attention as A

        for kernel in ("fwd", "dkdv", "dq"):
            offered = A.prune(kernel, A.sm90_configs(kernel), 2, d, d, 0, "ieee", family="all")
            lines += [f"| {op} | {kernel} | {_shape(shape, None)} | {describe(c)} | "
                      f"{static_of(static, op, kernel, c, d)} |" for c in offered]
    else:
        from bigmodel.kernels import linear_relu as LR

        for kernel, extra in (("fwd", 0), ("dx", 1), ("dw", 1)):
            offered = LR.prune(LR.sm90_configs(kernel), 2, extra, family="all")
            lines += [f"| {op} | {kernel} | {_shape(shape, None)} | {describe(c)} | "
                      f"{static_of(static, op, kernel, c, None)} |" for c in offered]
    return lines


def _shape(shape, causal):
    text = ",".join(f"{k}={v}" for k, v in shape.items())
    return text + (f",causal={int(causal)}" if causal is not None else "")


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m bench.picks", description=__doc__.split("\n\n")[0])
    p.add_argument("--dry-run", action="store_true", help="list the candidates and their static facts, no GPU")
    p.add_argument("--time-limit", type=float, default=None, help="seconds after which no new case starts")
    p.add_argument("--out", default=None, help="also write the table to this file")
    args = p.parse_args(argv)
    static = read_static()
    if not static:
        print(f"bench.picks: no static table at {STATIC} (python -m bench.sm90 writes it)", file=sys.stderr)
    start = time.time()
    if args.dry_run:
        lines = ["| op | kernel | case | candidate (bf16) | static facts |", "|---|---|---|---|---|"]
        seen = set()
        for op, shape, _ in CASES:
            key = (op, shape.get("D"))
            if key not in seen:
                seen.add(key)
                lines += candidates(op, shape, static)
    else:
        if not torch.cuda.is_available():
            raise SystemExit("bench.picks: needs a CUDA GPU (or --dry-run)")
        lines = ["| op | kernel | case (bf16) | pick | its static facts | runner-up | best of the other family | "
                 "its static facts | configs timed |", "|" + "---|" * 9]
        per_case = None
        for op, shape, causal in CASES:
            left = None if args.time_limit is None else args.time_limit - (time.time() - start)
            if left is not None and per_case is not None and left < per_case:
                lines.append(f"| {op} | | {_shape(shape, causal)} | not run: {left:.0f} s left | | | | | |")
                continue
            t0 = time.time()
            lines += measure(op, shape, causal, static, torch.device("cuda"))
            per_case = max(per_case or 0, time.time() - t0)
            print(f"bench.picks: {op} {_shape(shape, causal)} in {time.time() - t0:.0f} s", file=sys.stderr)
    text = "\n".join(lines)
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
