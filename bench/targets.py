"""The speed targets the issues set, checked against a results CSV.

python -m bench.targets bench/results/cpu_avx2.csv      # prints a Markdown table

Each target compares one bigmodel provider with one torch provider (or the best torch
provider) on one case of the same run: ratio = torch ms / bigmodel ms. A target may hold only
at some CPU levels (``levels``: a word the row's cpu_level must contain, or '!word' one it must
not), and its minimum may depend on the level (``at``: level word -> minimum). Shape '*' is
every shape of that op, mode and dtype in the run: the worst one is shown.
"""
import sys
from typing import Dict, NamedTuple, Optional

from bench import report


class Target(NamedTuple):
    issue: str
    op: str
    mode: str
    dtype: str
    shape: str
    big: str  # bigmodel provider, or "best"
    base: str  # torch provider, or "best"
    minimum: float
    note: str = ""
    levels: Optional[str] = None
    at: Optional[Dict[str, float]] = None


_ATT = {"causal0": "B=2,H=8,L=1024,S=1024,D=64,causal=0", "causal1": "B=2,H=8,L=1024,S=1024,D=64,causal=1",
        "d128": "B=1,H=4,L=2048,S=2048,D=128,causal=0", "b4": "B=4,H=8,L=512,S=512,D=64,causal=0"}
_STEPS = (("mlp_step", "B=1024,layers=784-512-256-10"), ("gan_step", "B=256,G=100-256-512-1024-784,D=784-512-256-1"),
          ("transformer_step", "B=8,L=256,d_model=256,heads=4,ff=1024"))
_DEFAULT_09 = {"DEFAULT": 0.9}  # issue 11: at the DEFAULT level never below 0.9x

CPU = [
    Target("2", "linear_relu", "fwd", "fp32", "M=65536,K=128,N=128", "bigmodel-cpp", "torch-eager", 1.3),
    Target("2", "linear_relu", "fwd", "fp32", "M=16384,K=256,N=256", "bigmodel-cpp", "torch-eager", 1.05),
    Target("2", "linear_relu", "fwd", "fp32", "M=4096,K=784,N=512", "bigmodel-cpp", "torch-eager", 0.97),
    Target("2", "linear_relu", "fwd", "fp32", "M=256,K=784,N=512", "bigmodel-cpp", "torch-eager", 0.97),
    Target("2", "mlp_step", "fwd+bwd", "fp32", _STEPS[0][1], "bigmodel-fused", "torch-eager", 1.05),
    Target("4", "attention", "fwd", "fp32", _ATT["causal0"], "bigmodel-cpp", "torch-sdpa", 1.0, "aim 1.2"),
    Target("4", "attention", "fwd", "fp32", _ATT["causal1"], "bigmodel-cpp", "torch-sdpa", 1.0, "aim 1.2"),
    Target("4", "attention", "fwd", "fp32", _ATT["d128"], "bigmodel-cpp", "torch-sdpa", 1.0, "aim 1.2"),
    Target("4", "attention", "fwd+bwd", "fp32", "B=2,H=8,L=512,S=512,D=64,causal=1", "bigmodel-cpp", "torch-sdpa", 1.0, "aim 1.2"),
]
# Issue 11: the same at every CPU level (AVX2 and DEFAULT included).
CPU += [Target("11", "attention", mode, "fp32", shape, "bigmodel-cpp", "torch-sdpa", 1.0, "aim 1.2", at=_DEFAULT_09)
        for shape in _ATT.values() for mode in ("fwd", "bwd", "fwd+bwd")]
CPU += [Target("11", "linear_relu", mode, "fp32", shape, "bigmodel-cpp", "torch-eager", 1.0, "", at=_DEFAULT_09)
        for shape in ("M=256,K=784,N=512", "M=1024,K=256,N=10", "*") for mode in ("fwd", "bwd")]
CPU += [Target("11", "linear_relu", "fwd", "fp32", "M=65536,K=128,N=128", "bigmodel-cpp", "torch-eager", 1.3)]
CPU += [Target("11", op, "fwd+bwd", "fp32", shape, "bigmodel-optimize", "torch-eager", 1.0, "1.03 at AVX2",
               at={"AVX2": 1.03}) for op, shape in _STEPS]
CPU += [Target("11", "linear_relu", "fwd", "bf16", "M=1024,K=784,N=512", "bigmodel-cpp", "torch-eager", 3.0,
               "bf16 not native", levels="!BF16"),
        Target("11", "attention", "fwd", "bf16", _ATT["causal0"], "bigmodel-cpp", "torch-sdpa", 3.0,
               "bf16 not native", levels="!BF16")]
# Issue 14: the rest of the linear + activation family, and the GAN step written as GANs are.
CPU += [Target("14", f"linear_{act}", "fwd", "fp32", shape, "bigmodel-cpp", "torch-eager",
               1.2 if (act, shape) == ("gelu", "M=16384,K=256,N=1024") else 1.0)
        for act in ("gelu", "silu", "tanh", "sigmoid", "leaky_relu")
        for shape in ("M=4096,K=784,N=512", "M=16384,K=256,N=1024")]
CPU += [Target("14", "gan_step", "fwd+bwd", "fp32", _STEPS[1][1], "bigmodel-optimize", "torch-eager", 1.05)]
GPU = [
    Target("8", "attention", "fwd", "bf16", "B=2,H=16,L=8192,S=8192,D=128,causal=0", "best", "best", 1.0, "and >= 450 TFLOP/s"),
    Target("8", "attention", "fwd", "bf16", "B=2,H=16,L=8192,S=8192,D=128,causal=1", "best", "best", 1.0),
    Target("8", "attention", "fwd+bwd", "bf16", "B=2,H=16,L=8192,S=8192,D=128,causal=0", "best", "best", 1.0),
    Target("8", "attention", "fwd", "bf16", "B=4,H=32,L=4096,S=4096,D=64,causal=0", "best", "best", 1.0),
    Target("8", "linear_relu", "fwd", "bf16", "M=8192,K=8192,N=8192", "best", "bound-addmm", 0.97, "vs addmm alone"),
    Target("8", "linear_relu", "fwd+bwd", "bf16", "M=65536,K=256,N=1024", "best", "torch-eager", 1.1),
    Target("8", "linear_relu", "fwd+bwd", "bf16", "M=65536,K=256,N=1024", "best", "torch-compile", 1.0),
]


def _for(device_type):
    return CPU if device_type == "cpu" else GPU if device_type == "cuda" else CPU + GPU


def names(case, device_type):
    """True when a target names ``case`` (its op, mode, dtype and shape; '*' names none)."""
    key = (case.op, case.mode, case.dtype_name, case.shape_str)
    return any((t.op, t.mode, t.dtype, t.shape) == key for t in _for(device_type))


def _applies(target, level):
    if not target.levels:
        return True
    word = target.levels.lstrip("!")
    return (word in level) != target.levels.startswith("!")


def _minimum(target, level):
    head = (level.split() or [""])[0].split("+")[0]  # 'AVX512+BF16 native' -> 'AVX512'
    for word, value in (target.at or {}).items():
        if head == word:
            return value
    return target.minimum


def _pick(rows, name, prefix):
    if name == "best":
        return report._best(report.measured(rows), prefix, exclude=("bigmodel-reference",))
    return next((r for r in rows if r["provider"] == name), None)


def _one(target, rs, shape):
    """(bigmodel row, torch row, ratio or None, why not measured)."""
    b, t = _pick(rs, target.big, "bigmodel"), _pick(rs, target.base, "torch")
    missing = [r for r in (b, t) if r is None or r.get("skipped")]
    if missing:
        why = "; ".join(f"{r['provider']} skipped: {r['skipped']}" for r in missing if r is not None)
        return b, t, None, why or "not measured"
    return b, t, float(t["ms_p50"]) / float(b["ms_p50"]), ""


def table(rows, device_type=None):
    """Markdown lines: one per target whose case is in ``rows`` (and whose levels it ran at)."""
    lines = ["| issue | case | bigmodel | ms | TFLOP/s | against | ms | ratio | target | met |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for tg in _for(device_type):
        sel = [r for r in rows if (r["op"], r["mode"], r["dtype"]) == (tg.op, tg.mode, tg.dtype)
               and (tg.shape == "*" or r["shape"] == tg.shape)]
        if not sel:
            continue
        level = sel[0].get("cpu_level") or ""
        if not _applies(tg, level):
            continue
        minimum = _minimum(tg, level)
        shapes = sorted({r["shape"] for r in sel})
        results = [(s, *_one(tg, [r for r in sel if r["shape"] == s], s)) for s in shapes]
        ranked = [x for x in results if x[3] is not None]
        shape, b, t, ratio, why = min(ranked, key=lambda x: x[3]) if ranked else results[0]
        label = f"{tg.op} {tg.mode} {tg.dtype} " + (f"`{tg.shape}`" if tg.shape != "*" else
                                                     f"every shape ({len(shapes)}; worst `{shape}`)")
        if ratio is None:
            lines.append(f"| {tg.issue} | {label} | {tg.big} | | | {tg.base} | | | >= {minimum} | {why} |")
            continue
        met = ratio >= minimum
        if tg.note.startswith("and >="):
            met = met and float(b["tflops"] or 0) >= float(tg.note.split()[2])
        unmeasured = len(results) - len(ranked)
        extra = f" ({unmeasured} not measured)" if unmeasured else ""
        lines.append(f"| {tg.issue} | {label} | {b['provider']} | {float(b['ms_p50']):.4g} | "
                     f"{float(b['tflops'] or 'nan'):.3g} | {t['provider']} | {float(t['ms_p50']):.4g} | {ratio:.2f}x | "
                     f">= {minimum}x {tg.note} | {'yes' if met else 'NO'}{extra} |")
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
