"""CSV, Markdown summary and plots, all drawn from the long-format CSV.

Speed ratios are time ratios on the same inputs in the same run: ``best torch ms / provider
ms``, so above 1.0x the provider is faster than PyTorch's best. Each figure is also shown as a
percentage of the ceilings measured in the same run (rows with op ``ceiling_matmul`` and
``ceiling_copy``).
"""
import csv
import math
import os
import re
from collections import OrderedDict, defaultdict

from bench.runner import COLUMNS

CEILINGS = ("ceiling_matmul", "ceiling_copy")
E2E = ("mlp_step", "transformer_step", "transformer_gelu_step", "gan_step")
MODE_ORDER = {"fwd": 0, "bwd": 1, "fwd+bwd": 2}


def slug(device_name):
    """File-name form of a device name: 'NVIDIA H200' -> 'nvidia_h200'."""
    return re.sub(r"[^a-z0-9]+", "_", device_name.lower()).strip("_") or "device"


def read_csv(path):
    if not os.path.exists(path):
        return []
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def _case_key(row):
    return (row["op"], row["mode"], row["dtype"], row["shape"], row["device"])


def merge(old, new):
    """``old`` rows minus every case (op, mode, dtype, shape, device) that ``new`` measured
    again, then ``new``: a case's rows always come from one run, so its ratios stay honest."""
    fresh = {_case_key(r) for r in new}
    return [r for r in old if _case_key(r) not in fresh] + list(new)


def write_csv(path, rows):
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=COLUMNS, extrasaction="ignore")
        w.writeheader()
        w.writerows(rows)
    os.replace(tmp, path)


def _f(value):
    try:
        return float(value)
    except (TypeError, ValueError):
        return math.nan


def parse_shape(shape):
    out = OrderedDict()
    for part in shape.split(","):
        k, _, v = part.partition("=")
        try:
            out[k] = int(v)
        except ValueError:
            out[k] = v
    return out


def _or_zero(v):
    return 0.0 if math.isnan(v) else v


def ceilings(rows):
    """dtype -> (matmul TFLOP/s, copy GB/s) from the ceiling rows."""
    out = defaultdict(lambda: [math.nan, math.nan])
    for r in rows:
        # The best provider of each ceiling (NaN-safe: a NaN never wins max()).
        if r["op"] == "ceiling_matmul":
            out[r["dtype"]][0] = max(_f(r["tflops"]), out[r["dtype"]][0], key=_or_zero)
        elif r["op"] == "ceiling_copy":
            out[r["dtype"]][1] = max(_f(r["gbps"]), out[r["dtype"]][1], key=_or_zero)
    return out


def measured(rows):
    """The rows with timings (not the skipped providers' rows)."""
    return [r for r in rows if not r.get("skipped")]


def _groups(rows):
    """OrderedDict (op, mode, dtype) -> OrderedDict shape -> [rows], in a stable reading order
    (measured rows only)."""
    ops = ["linear_relu", "attention", *E2E]
    keyed = sorted(
        (r for r in measured(rows) if r["op"] not in CEILINGS),
        key=lambda r: (ops.index(r["op"]) if r["op"] in ops else len(ops), r["op"],
                       MODE_ORDER.get(r["mode"], 9), r["dtype"]))
    out = OrderedDict()
    for r in keyed:
        out.setdefault((r["op"], r["mode"], r["dtype"]), OrderedDict()).setdefault(r["shape"], []).append(r)
    return out


def _best(rows, prefix, exclude=()):
    cands = [r for r in rows if r["provider"].startswith(prefix) and r["provider"] not in exclude
             and not math.isnan(_f(r["ms_p50"]))]
    return min(cands, key=lambda r: _f(r["ms_p50"])) if cands else None


def _ratio(a_ms, b_ms):
    return f"{a_ms / b_ms:.2f}x" if a_ms > 0 and b_ms > 0 else ""


def _pct(value, ceiling):
    return f"{100 * value / ceiling:.0f}%" if value > 0 and ceiling > 0 else ""


def _num(value, fmt="{:.3g}"):
    return fmt.format(value) if not math.isnan(value) else ""


def levels(rows):
    """The CPU levels the rows ran at, as one string ('AVX2 capped')."""
    return ", ".join(sorted({r.get("cpu_level") or "level not recorded" for r in rows}))


def summary(rows, device_name, header_lines=(), skipped=(), mismatches=(), target_lines=()):
    """The Markdown summary: ceilings, a headline table (best bigmodel backend against best
    torch provider per case), then every provider per case, then what was skipped: the
    providers' skip rows, and ``skipped`` (case, provider, reason) for cases never started."""
    ceil = ceilings(rows)
    title = f"{device_name}, {levels(rows)}" if device_name == "cpu" and rows else device_name
    lines = [f"# bigmodel benchmarks: {title}", ""]
    lines += list(header_lines)
    lines += ["", "Ratios are `best torch ms / provider ms` on the same inputs in the same run "
              "(above 1.00x = faster than PyTorch's best); `% peak` is TFLOP/s over the matmul "
              "ceiling and `% BW` GB/s over the copy ceiling of the same dtype, both measured in "
              "the run. Times are medians, with p20 and p80.", ""]
    lines += ["## Ceilings", "", "| dtype | matmul TFLOP/s | shape | copy GB/s |", "|---|---|---|---|"]
    for dtype in sorted(ceil):
        mm = next((r for r in measured(rows) if r["op"] == "ceiling_matmul" and r["dtype"] == dtype), None)
        lines.append(f"| {dtype} | {_num(ceil[dtype][0])} | {mm['shape'] if mm else ''} | {_num(ceil[dtype][1], '{:.0f}')} |")
    if len(target_lines) > 2:
        lines += ["", "## The issues' speed targets", "", *target_lines]
    groups = _groups(rows)
    lines += ["", "## bigmodel against PyTorch's best", "",
              "| op | mode | dtype | shape | bigmodel | ms | TFLOP/s | % peak | best torch | ms | speed-up | vs eager |",
              "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for (op, mode, dtype), shapes in groups.items():
        for shape, rs in shapes.items():
            big = _best(rs, "bigmodel", exclude=("bigmodel-reference",))
            tor = _best(rs, "torch")
            if big is None and tor is None:
                continue
            bms, tms = _f(big["ms_p50"]) if big else math.nan, _f(tor["ms_p50"]) if tor else math.nan
            eager = next((r for r in rs if r["provider"] == "torch-eager"), None)
            lines.append(
                f"| {op} | {mode} | {dtype} | `{shape}` | {big['provider'] if big else '(none ran)'} | "
                f"{_num(bms)} | {_num(_f(big['tflops'])) if big else ''} | "
                f"{_pct(_f(big['tflops']), ceil[dtype][0]) if big else ''} | "
                f"{tor['provider'] if tor else '(none ran)'} | {_num(tms)} | {_ratio(tms, bms)} | "
                f"{_ratio(_f(eager['ms_p50']), bms) if eager else ''} |")
    lines += ["", "## Every provider", ""]
    for (op, mode, dtype), shapes in groups.items():
        lines += [f"### {op} {mode} {dtype}", "",
                  "| shape | provider | ms p50 [p20, p80] | TFLOP/s | % peak | GB/s | % BW | peak MB | vs best torch | vs eager |",
                  "|---|---|---|---|---|---|---|---|---|---|"]
        for shape, rs in shapes.items():
            tor = _best(rs, "torch")
            eager = next((r for r in rs if r["provider"] == "torch-eager"), None)
            for r in sorted(rs, key=lambda r: _f(r["ms_p50"])):
                ms = _f(r["ms_p50"])
                tf, gb = _f(r["tflops"]), _f(r["gbps"])
                lines.append(
                    f"| `{shape}` | {r['provider']} | {_num(ms)} [{_num(_f(r['ms_p20']))}, {_num(_f(r['ms_p80']))}] | "
                    f"{_num(tf)} | {_pct(tf, ceil[dtype][0])} | {_num(gb)} | {_pct(gb, ceil[dtype][1])} | "
                    f"{_num(_f(r['peak_mem_mb']), '{:.1f}')} | "
                    f"{_ratio(_f(tor['ms_p50']), ms) if tor else ''} | "
                    f"{_ratio(_f(eager['ms_p50']), ms) if eager else ''} |")
        lines.append("")
    if mismatches:
        lines += ["## Output mismatches (forward output against the first torch provider)", ""]
        lines += [f"- {case} {name}: relative max error {err:.3g}" for case, name, err in mismatches]
        lines.append("")
    lines += _skipped_section(rows, skipped)
    return "\n".join(lines) + "\n"


def _skipped_section(rows, not_started):
    """Why providers have no timings: over budget one per line (with the first call's time),
    the other reasons grouped; then the cases a time limit left unstarted."""
    skips = [r for r in rows if r.get("skipped")]
    if not (skips or not_started):
        return []
    lines = ["## Skipped", ""]
    late = {str(case) for case, _, _ in not_started}
    if late:
        lines.append(f"- {len(late)} case(s) not started in the latest run: {not_started[0][2]} "
                     "(see `--time-limit`; their older rows, if any, are kept)")
    over = [r for r in skips if r["skipped"].startswith("over budget")]
    if over:
        lines += ["", "Over budget (see `--provider-budget`):", "", "| case | provider | why |", "|---|---|---|"]
        lines += [f"| {r['op']} {r['mode']} {r['dtype']} `{r['shape']}` | {r['provider']} | {r['skipped']} |"
                  for r in over]
        lines.append("")
    by_reason = OrderedDict()
    for r in skips:
        if r not in over:
            by_reason.setdefault((r["provider"], r["skipped"]), []).append(r)
    for (name, reason), rs in by_reason.items():
        example = ", ".join(f"{r['op']} {r['mode']} {r['dtype']} `{r['shape']}`" for r in rs[:2])
        more = f" and {len(rs) - 2} more" if len(rs) > 2 else ""
        lines.append(f"- {name}: {reason} ({len(rs)} case(s): {example}{more})")
    lines.append("")
    return lines


def plot_families(op, shape):
    """(family title, x name, x value) of a row for the plots, or None (not on a line)."""
    s = parse_shape(shape)
    if op == "attention":
        return f"D={s['D']} causal={s['causal']} (H*D={s['H'] * s['D']})", "L", s["L"]
    if {"M", "K", "N"} <= set(s):  # the linear + activation family
        M, K, N = s["M"], s["K"], s["N"]
        if M == K == N:
            return "square M=K=N", "N", N
        if N == 4 * K:
            return f"FFN d->4d at M={M}", "d (K)", K
        return f"K={K} N={N}", "M", M
    return None


def plots(rows, out_dir, device_name, stem=None):
    """One PNG per (op, dtype), <stem>_<op>_<dtype>.png (stem: the device's slug by default):
    a grid of families (rows) by modes (columns), TFLOP/s against length or size, one line per
    provider, the matmul ceiling dashed. Returns the paths."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ceil = ceilings(rows)
    data = defaultdict(lambda: defaultdict(lambda: defaultdict(list)))  # (op,dtype) -> fam -> mode -> rows
    xnames = {}
    for r in measured(rows):
        if r["op"] in CEILINGS or r["op"] in E2E or math.isnan(_f(r["tflops"])):
            continue
        fam = plot_families(r["op"], r["shape"])
        if fam is None:
            continue
        title, xname, x = fam
        xnames[title] = xname
        data[(r["op"], r["dtype"])][title][r["mode"]].append((x, r))
    paths = []
    for (op, dtype), fams in sorted(data.items()):
        # A family is worth a line only with two or more sizes.
        fams = {t: m for t, m in fams.items() if any(len({x for x, _ in v}) > 1 for v in m.values())}
        if not fams:
            continue
        modes = sorted({m for f in fams.values() for m in f}, key=lambda m: MODE_ORDER.get(m, 9))
        # One colour per provider across the whole figure.
        names = sorted({r["provider"] for f in fams.values() for v in f.values() for _, r in v})
        palette = plt.get_cmap("tab10")
        color = {n: palette(i % 10) for i, n in enumerate(names)}
        fig, axes = plt.subplots(len(fams), len(modes), figsize=(4.6 * len(modes), 3.4 * len(fams)),
                                 squeeze=False)
        for i, (title, by_mode) in enumerate(sorted(fams.items())):
            for j, mode in enumerate(modes):
                ax = axes[i][j]
                lines = defaultdict(dict)
                for x, r in by_mode.get(mode, []):
                    # Two shapes at one x (a target shape beside the sweep's point): keep the
                    # larger problem, the sweep's.
                    flops = _f(r["tflops"]) * _f(r["ms_p50"])
                    if x not in lines[r["provider"]] or flops > lines[r["provider"]][x][1]:
                        lines[r["provider"]][x] = (_f(r["tflops"]), flops)
                for provider in sorted(lines):
                    pts = sorted((x, v[0]) for x, v in lines[provider].items())
                    style = "-" if provider.startswith("bigmodel") else ":" if provider.startswith("bound") else "--"
                    ax.plot([p[0] for p in pts], [p[1] for p in pts], style, marker="o", ms=3,
                            color=color[provider], lw=2 if provider.startswith("bigmodel") else 1.2,
                            label=provider)
                if not math.isnan(ceil[dtype][0]):
                    ax.axhline(ceil[dtype][0], color="gray", ls=":", lw=1, label="matmul ceiling")
                ax.set_xscale("log", base=2)
                ax.set_title(f"{mode}: {title}", fontsize=9)
                ax.set_xlabel(xnames[title], fontsize=8)
                ax.set_ylabel("TFLOP/s", fontsize=8)
                ax.tick_params(labelsize=7)
                ax.grid(alpha=0.3)
                if lines:
                    ax.legend(fontsize=6)
        where = f"{device_name} ({levels(rows)})" if device_name == "cpu" else device_name
        fig.suptitle(f"{op} {dtype} on {where}", fontsize=11)
        fig.tight_layout()
        path = os.path.join(out_dir, f"{stem or slug(device_name)}_{op}_{dtype}.png")
        fig.savefig(path, dpi=90)
        plt.close(fig)
        paths.append(path)
    return paths
