"""The README's results table for one committed run, rendered from its summary and CSV.

    python -m bench.readme bench/results/cpu_avx2_summary.md               # prints the Markdown
    python -m bench.readme bench/results/cpu_avx2_summary.md --write README.md

The table holds the cases bench.targets names (at the run's CPU level), each with torch's and
bigmodel's time, the ratio and the target; above it a line names the machine, the level, the
date, the commit and the command, read from the summary's header. ``--write`` replaces what
stands between ``<!-- bench:STEM -->`` and ``<!-- /bench:STEM -->`` in the file (STEM: the
summary's name without ``_summary.md``, e.g. cpu_avx2), so each level's table is redrawn from
its own run.
"""
import argparse
import os
import re
import sys

from bench import report, targets


def _header(summary_text):
    """The summary's ``- key: value`` header lines as a dict (device, CPU level, torch, ...)."""
    out = {}
    for line in summary_text.splitlines():
        m = re.match(r"- ([A-Za-z ]+?): (.*)", line)
        if m and m.group(1) not in out:
            out[m.group(1)] = m.group(2)
        elif line.startswith("- torch "):
            out["torch"] = line[2:]
    return out


def caption(summary_text, stem):
    """One line: level, machine, date, commit and command of the run."""
    h = _header(summary_text)
    run = h.get("torch", "")
    date = re.search(r"latest run (\d{4}-\d\d-\d\d)", run)
    sha = re.search(r"git ([0-9a-f]+(?:-dirty)?)", run)
    cmd = re.search(r"`([^`]*)`", run)
    level = h.get("CPU level", "").split(" (")[0]
    return (f"**{level or stem}** on {h.get('device', 'an unnamed machine')}; run of "
            f"{date.group(1) if date else '(undated)'}, git {sha.group(1) if sha else '?'}"
            + (f", `{cmd.group(1)}`" if cmd else "") + f". Full tables: `bench/results/{stem}_summary.md`.")


def table(rows, device_type):
    """Markdown lines: one per case a target names, with the highest minimum that applies."""
    chosen = {}
    for tg in targets._for(device_type):
        if tg.shape == "*":
            continue
        rs = [r for r in rows if (r["op"], r["mode"], r["dtype"], r["shape"]) == (tg.op, tg.mode, tg.dtype, tg.shape)]
        level = next((r.get("cpu_level") or "" for r in rs), "")
        if not rs or not targets._applies(tg, level):
            continue
        key = (tg.op, tg.mode, tg.dtype, tg.shape)
        minimum = targets._minimum(tg, level)
        if key not in chosen or minimum > chosen[key][1]:
            chosen[key] = (tg, minimum, rs)
    lines = ["| case | shape | PyTorch ms | bigmodel ms | ratio | target |", "|---|---|---|---|---|---|"]
    for (op, mode, dtype, shape), (tg, minimum, rs) in chosen.items():
        b, t, ratio, why = targets._one(tg, rs, shape)
        pretty = shape.replace(",", ", ")
        if ratio is None:
            lines.append(f"| {op} {mode} {dtype} | {pretty} | | | {why} | >= {minimum}x |")
            continue
        lines.append(f"| {op} {mode} {dtype} | {pretty} | {float(t['ms_p50']):.4g} ({t['provider']}) | "
                     f"{float(b['ms_p50']):.4g} | {ratio:.2f}x | >= {minimum}x{'' if ratio >= minimum else ' (not met)'} |")
    return lines


def render(summary_path):
    stem = os.path.basename(summary_path)[: -len("_summary.md")]
    rows = report.read_csv(os.path.join(os.path.dirname(summary_path), stem + ".csv"))
    if not rows:
        raise SystemExit(f"bench.readme: no rows in {stem}.csv beside {summary_path}")
    with open(summary_path) as f:
        text = f.read()
    device_type = "cpu" if rows[0]["device"] == "cpu" else "cuda"
    return stem, "\n".join([caption(text, stem), "", *table(rows, device_type)])


def write(path, stem, block):
    """Replaces the text between the ``bench:STEM`` markers of ``path`` with ``block``."""
    with open(path) as f:
        text = f.read()
    begin, end = f"<!-- bench:{stem} -->", f"<!-- /bench:{stem} -->"
    if begin not in text or end not in text:
        raise SystemExit(f"bench.readme: {path} has no '{begin}' ... '{end}' markers to write between")
    head, rest = text.split(begin, 1)
    _, tail = rest.split(end, 1)
    with open(path, "w") as f:
        f.write(f"{head}{begin}\n{block}\n{end}{tail}")


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m bench.readme", description=__doc__.split("\n\n")[0])
    p.add_argument("summary", help="a run's <stem>_summary.md (its <stem>.csv must sit beside it)")
    p.add_argument("--write", metavar="README", help="replace the table between the file's markers")
    args = p.parse_args(argv)
    stem, block = render(args.summary)
    if args.write:
        write(args.write, stem, block)
    else:
        print(block)
    return 0


if __name__ == "__main__":
    sys.exit(main())
