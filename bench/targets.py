"""The speed targets the issues set, checked against a results CSV.

python -m bench.targets bench/results/cpu.csv      # prints a Markdown table

Each target compares one bigmodel provider with one torch provider (or the best torch
provider) on one case of the same run: ratio = torch ms / bigmodel ms.
"""
import sys

from bench import report

# (issue, op, mode, dtype, shape, bigmodel provider or "best", baseline provider or "best", minimum, note)
CPU = [
    ("2", "linear_relu", "fwd", "fp32", "M=65536,K=128,N=128", "bigmodel-cpp", "torch-eager", 1.3, ""),
    ("2", "linear_relu", "fwd", "fp32", "M=16384,K=256,N=256", "bigmodel-cpp", "torch-eager", 1.05, ""),
    ("2", "linear_relu", "fwd", "fp32", "M=4096,K=784,N=512", "bigmodel-cpp", "torch-eager", 0.97, ""),
    ("2", "linear_relu", "fwd", "fp32", "M=256,K=784,N=512", "bigmodel-cpp", "torch-eager", 0.97, ""),
    ("2", "mlp_step", "fwd+bwd", "fp32", "B=1024,layers=784-512-256-10", "bigmodel-fused", "torch-eager", 1.05, ""),
    ("4", "attention", "fwd", "fp32", "B=2,H=8,L=1024,S=1024,D=64,causal=0", "bigmodel-cpp", "torch-sdpa", 1.0, "aim 1.2"),
    ("4", "attention", "fwd", "fp32", "B=2,H=8,L=1024,S=1024,D=64,causal=1", "bigmodel-cpp", "torch-sdpa", 1.0, "aim 1.2"),
    ("4", "attention", "fwd", "fp32", "B=1,H=4,L=2048,S=2048,D=128,causal=0", "bigmodel-cpp", "torch-sdpa", 1.0, "aim 1.2"),
    ("4", "attention", "fwd+bwd", "fp32", "B=2,H=8,L=512,S=512,D=64,causal=1", "bigmodel-cpp", "torch-sdpa", 1.0, "aim 1.2"),
]
GPU = [
    ("8", "attention", "fwd", "bf16", "B=2,H=16,L=8192,S=8192,D=128,causal=0", "best", "best", 1.0, "and >= 450 TFLOP/s"),
    ("8", "attention", "fwd", "bf16", "B=2,H=16,L=8192,S=8192,D=128,causal=1", "best", "best", 1.0, ""),
    ("8", "attention", "fwd+bwd", "bf16", "B=2,H=16,L=8192,S=8192,D=128,causal=0", "best", "best", 1.0, ""),
    ("8", "attention", "fwd", "bf16", "B=4,H=32,L=4096,S=4096,D=64,causal=0", "best", "best", 1.0, ""),
    ("8", "linear_relu", "fwd", "bf16", "M=8192,K=8192,N=8192", "best", "bound-addmm", 0.97, "vs addmm alone"),
    ("8", "linear_relu", "fwd+bwd", "bf16", "M=65536,K=256,N=1024", "best", "torch-eager", 1.1, ""),
    ("8", "linear_relu", "fwd+bwd", "bf16", "M=65536,K=256,N=1024", "best", "torch-compile", 1.0, ""),
]


def _pick(rows, name, prefix):
    if name == "best":
        return report._best(rows, prefix, exclude=("bigmodel-reference",))
    return next((r for r in rows if r["provider"] == name), None)


def table(rows, device_type=None):
    """Markdown lines: one per target whose case is in ``rows``."""
    targets = CPU if device_type == "cpu" else GPU if device_type == "cuda" else CPU + GPU
    lines = ["| issue | case | bigmodel | ms | TFLOP/s | against | ms | ratio | target | met |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for issue, op, mode, dtype, shape, big, base, minimum, note in targets:
        rs = [r for r in rows if (r["op"], r["mode"], r["dtype"], r["shape"]) == (op, mode, dtype, shape)]
        if not rs:
            continue
        b, t = _pick(rs, big, "bigmodel"), _pick(rs, base, "torch")
        if b is None or t is None:
            lines.append(f"| {issue} | {op} {mode} {dtype} `{shape}` | {big} | | | {base} | | | >= {minimum} | not measured |")
            continue
        bms, tms = float(b["ms_p50"]), float(t["ms_p50"])
        ratio = tms / bms
        met = ratio >= minimum
        if note.startswith("and >="):
            met = met and float(b["tflops"] or 0) >= float(note.split()[2])
        lines.append(f"| {issue} | {op} {mode} {dtype} `{shape}` | {b['provider']} | {bms:.4g} | "
                     f"{float(b['tflops'] or 'nan'):.3g} | {t['provider']} | {tms:.4g} | {ratio:.2f}x | "
                     f">= {minimum}x {note} | {'yes' if met else 'NO'} |")
    return lines


def main(argv):
    if len(argv) != 1:
        print(__doc__.strip().splitlines()[2].strip(), file=sys.stderr)
        return 2
    rows = report.read_csv(argv[0])
    device = rows[0]["device"] if rows else ""
    print("\n".join(table(rows, "cpu" if device == "cpu" else "cuda" if device else None)))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
