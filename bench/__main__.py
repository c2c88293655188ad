"""python -m bench: measure bigmodel against PyTorch's best on the best device present.

Examples::

    python -m bench                          # the full sweep (CUDA if present, else CPU)
    python -m bench --quick                  # a few minutes: the issues' target shapes and short sweeps
    python -m bench --ops attention --modes fwd --dtypes bf16 --device cuda
    python -m bench --report-only            # redraw summary and plots from the CSV
    python -m bench --quick --cpu-capability avx2   # as an AVX2 CPU runs it (ATen, oneDNN, MKL capped)

Writes <out>/<name>.csv (long format, one row per case and provider, measured or skipped; a
case measured again replaces its old rows), <out>/<name>_summary.md and
<out>/<name>_<op>_<dtype>.png, where <name> is the GPU's name or, on CPU, cpu_<level>
(cpu_avx2, cpu_avx512, cpu_default: the level torch runs at), so each level keeps its files.
"""
import argparse
import datetime
import os
import platform
import subprocess
import sys

import torch

from bench import attention, ceilings, cpu_level, end_to_end, linear_relu, report, targets
from bench.core import DTYPES, MODES, compile_modes, reset_compile
from bench.progress import Estimator, Progress, fmt_duration, model_seconds
from bench.runner import Runner, budget_for, run_all

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OPS = (*linear_relu.OPS, "attention", *end_to_end.OPS)
ALIASES = {"e2e": end_to_end.OPS, "fused_linear": tuple(o for o in linear_relu.OPS if o != "linear_relu"),
           "all": OPS}
# --quick promises under 5 minutes on a 2-core CPU and under 4 on an H200, and the full sweep
# under 25 minutes on a 2-core CPU without AVX-512: no case starts after these many seconds
# (the cases most worth having run first). The full GPU sweep has no limit.
QUICK_LIMIT = {"cpu": 240.0, "cuda": 180.0}
FULL_LIMIT = {"cpu": 1320.0, "cuda": None}


def _csv_list(text, allowed, what, aliases=None):
    out = []
    for item in (t.strip() for t in text.split(",") if t.strip()):
        expanded = (aliases or {}).get(item, (item,))
        for name in expanded:
            if name not in allowed:
                raise SystemExit(f"bench: unknown {what} {name!r}; expected some of {', '.join(allowed)}")
            if name not in out:
                out.append(name)
    return out


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m bench", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ops", default="all",
                   help=f"comma list of {', '.join(OPS)}; 'e2e' = the training steps, 'fused_linear' = the "
                        "linear + activation rows other than linear_relu (default: all)")
    p.add_argument("--modes", default=",".join(MODES), help="comma list of fwd, bwd, fwd+bwd (default: all)")
    p.add_argument("--dtypes", default=None,
                   help="comma list of fp32, fp16, bf16 (default: bf16,fp16,fp32 on GPU and fp32,bf16 on "
                        "CPU; with --quick bf16 on GPU and fp32 on CPU)")
    p.add_argument("--device", default=None, help="cuda, cuda:N or cpu (default: cuda if available)")
    p.add_argument("--quick", action="store_true",
                   help="short sweeps (under 5 min on a 2-core CPU, under 4 on an H200)")
    p.add_argument("--out", default=os.path.join(REPO, "bench", "results"), help="output folder")
    p.add_argument("--providers", default=None,
                   help="only providers whose name contains one of these comma-separated words")
    p.add_argument("--families", default=None,
                   help="only cases whose family contains one of these comma-separated words (e.g. "
                        "'issue,e2e': the issues' target shapes and the training steps)")
    p.add_argument("--no-compile", action="store_true", help="leave out the torch.compile providers")
    p.add_argument("--cpu-capability", choices=cpu_level.ORDER, default=None,
                   help="run at this CPU level, capping ATen (ATEN_CPU_CAPABILITY), oneDNN "
                        "(ONEDNN_MAX_CPU_ISA) and MKL (MKL_ENABLE_INSTRUCTIONS) in a fresh process, "
                        "so an AVX-512 machine runs what an AVX2 one would (default: the CPU's own)")
    p.add_argument("--provider-budget", type=float, default=None,
                   help="seconds one provider's timing in one case may take, judged from its first "
                        "timed call; a slower one is skipped as over budget (default 20 on CPU, 8 with "
                        "--quick; 60 and 30 on GPU; 0 = no limit)")
    p.add_argument("--threads", type=int, default=None,
                   help="CPU threads for torch and bigmodel (torch.set_num_threads; default: torch's)")
    p.add_argument("--reps", type=int, default=None, help="timed repetitions per provider (default: by time budget)")
    p.add_argument("--time-limit", type=float, default=None,
                   help="seconds after which no new case starts (the rest is reported as skipped); "
                        f"default {FULL_LIMIT['cpu']:.0f} on CPU, none on GPU; with --quick "
                        f"{QUICK_LIMIT['cpu']:.0f} on CPU and {QUICK_LIMIT['cuda']:.0f} on GPU; 0 = none")
    p.add_argument("--smoke", action="store_true", help=argparse.SUPPRESS)  # tiny shapes: tests the plumbing
    p.add_argument("--list", action="store_true", help="list the cases (and the run-time estimate) and exit")
    p.add_argument("--report-only", action="store_true", help="redraw summary and plots from the CSV")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("-v", "--verbose", action="store_true", help="print every skipped provider")
    return p.parse_args(argv)


def _device(arg):
    if arg is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(arg)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("bench: --device cuda but torch sees no CUDA device")
    if dev.type not in ("cuda", "cpu"):
        raise SystemExit(f"bench: unsupported device {arg!r}; expected cuda or cpu")
    return dev


def device_name(device):
    return torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"


def _cpu_model():
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def git_sha():
    try:
        sha = subprocess.run(["git", "rev-parse", "--short=12", "HEAD"], cwd=REPO, capture_output=True,
                             text=True, timeout=10).stdout.strip()
        if not sha:
            return "unknown"
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO,
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return sha + ("-dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def triton_version():
    try:
        import triton

        return triton.__version__
    except ImportError:
        return ""


def smoke_cases(device, modes, dtypes):
    """Tiny shapes of every op: exercises the whole pipeline in seconds (tests/test_bench.py)."""
    out = ceilings.cases(device, dtypes, tiny=True)
    for dtype in dtypes:
        for mode in modes:
            for M in (16, 48):
                out.append(linear_relu.case(M, 32, 24, mode, dtype, device, True, "", "M"))
            for L in (16, 32):
                out.append(attention.case(1, 2, L, 16, False, mode, dtype, device, True, "", "L"))
        if "fwd+bwd" in modes:
            out.append(end_to_end.mlp_case(device, dtype, True, batch=8))
    return out


def bf16_scope(args, device, native_bf16):
    """Which bf16 cases run: 'all'; 'priority' (the forwards of linear_relu's and attention's
    target shapes: a full CPU run where bf16 is not native, as torch's bf16 there is slow and
    says little beyond the targets); 'targets' (only the shapes bench.targets names in bf16:
    --quick on CPU)."""
    if device.type == "cuda" or args.dtypes:
        return "all"
    if args.quick:
        return "targets"
    return "all" if native_bf16 else "priority"


def _keep_bf16(case, scope, device):
    if scope == "all" or case.dtype_name != "bf16" or case.op.startswith("ceiling"):
        return True
    # The other activations' bf16 forwards run linear_relu's bf16 path with another epilogue and
    # their targets are fp32; at 16384x256->1024 torch's bf16 takes 60-73 s a case without native
    # bf16 (5.3 of a native AVX2 EPYC's 22 minutes), which the fp32 sweep's largest cases need.
    if scope == "priority" and case.priority and case.mode == "fwd" and case.op in ("linear_relu", "attention"):
        return True
    return targets.names(case, device.type)


def build_cases(args, device, ops, modes, dtypes, budget=None, bf16="all"):
    """The cases to run, in the order they run (see ``rank``)."""
    if args.smoke:
        cases = [c for c in smoke_cases(device, modes, dtypes) if c.op in ops or c.op.startswith("ceiling")]
    else:
        cases = ceilings.cases(device, dtypes)
        cases += linear_relu.cases(device, modes, dtypes, args.quick, ops)
        if "attention" in ops:
            cases += attention.cases(device, modes, dtypes, args.quick)
        e2e = [c for c in end_to_end.cases(device, modes, dtypes, args.quick) if c.op in ops]
        cases += e2e
    cases = [c for c in cases if _keep_bf16(c, bf16, device)]
    words = [w.strip() for w in (args.providers or "").split(",") if w.strip()]
    compiled = {name for name, _ in compile_modes(device, False)}
    for c in cases:
        if c.op.startswith("ceiling"):
            continue
        if words:
            c.providers = [p for p in c.providers if any(w in p.name for w in words)]
        # --quick compiles only where it answers a question: the target shapes and the
        # training steps, fwd and fwd+bwd (a bwd row of a compiled graph adds little). On CPU,
        # where one compile takes seconds of the run's 25 minutes, no run compiles a bwd row.
        cpu_bwd = device.type == "cpu" and c.mode == "bwd"
        if args.no_compile or args.smoke or cpu_bwd or (args.quick and (c.mode == "bwd" or not (c.priority or c.family == "e2e"))):
            c.providers = [p for p in c.providers if p.name not in compiled]
        # The plain-PyTorch reference is a correctness short-circuit, not a contender; on CPU
        # its backward (attention's materialised scores) cost more than the rest of the case.
        if device.type == "cpu" and c.mode != "fwd" and not args.smoke:
            c.providers = [p for p in c.providers if p.name != "bigmodel-reference"]
    fams = [w.strip() for w in (args.families or "").split(",") if w.strip()]
    if fams:
        cases = [c for c in cases if c.op.startswith("ceiling") or any(w in c.family for w in fams)
                 or (c.priority and "issue" in fams)]
    # The ceilings, then the issues' target shapes (attention's first: its kernels are the
    # heaviest claims), then the training steps, then the sweeps; within each, dtypes in the
    # order asked and the cheapest (modelled) case first: a run cut short by --time-limit
    # loses the least telling rows, and the first rows come within seconds.
    def rank(c):
        if c.op.startswith("ceiling"):
            group = 0
        elif c.priority:
            group = 1 if c.op == "attention" else 2
        else:
            group = 3 if c.family == "e2e" else 4
        cost = model_seconds(c, budget, 1) if budget is not None else 0.0
        return group, dtypes.index(c.dtype), cost

    return sorted((c for c in cases if c.providers), key=rank)


def _level_lines(device, level, native16, scope):
    """Summary lines on the CPU level and on what bf16 means at it."""
    env = " ".join(f"{k}={os.environ[k]}" for k in cpu_level.ENV_KEYS if k in os.environ) or "no caps"
    lines = [f"- CPU level: {level} ({env}; this CPU runs up to {cpu_level.native_level().upper()})"]
    if device.type == "cpu":
        why = ("native (avx512_bf16 or AMX, not capped)" if native16 else
               "not native at this level (no avx512_bf16/amx_bf16, or capped below AVX512): torch's "
               "bf16 GEMMs are slow here; a provider over its time budget is skipped")
        scope_note = {"all": "", "priority": "; the bf16 sweep is left out, only the forwards of "
                      "linear_relu's and attention's target shapes run in bf16 (`--dtypes "
                      "fp32,bf16` runs it all)",
                      "targets": "; --quick runs bf16 only at the bf16 target shapes"}[scope]
        lines.append(f"- bf16: {why}{scope_note}")
    return lines


def main(argv=None):
    args = parse_args(argv)
    if args.cpu_capability:
        cpu_level.check_supported(args.cpu_capability)
        if cpu_level.needs_relaunch(args.cpu_capability):
            # The caps must be in the environment before torch loads: a fresh process.
            return cpu_level.relaunch(sys.argv[1:] if argv is None else list(argv), args.cpu_capability,
                                      replace=argv is None)
        cpu_level.verify(args.cpu_capability)
    cpu_level.isolate_compile_cache(cpu_level.torch_level())  # before anything compiles
    if args.threads:
        torch.set_num_threads(args.threads)
    device = _device(args.device)
    name = device_name(device)
    level = cpu_level.describe()
    native16 = cpu_level.native_bf16()
    out_dir = os.path.abspath(args.out)
    # One set of files per CPU level (cpu_avx2.csv, cpu_avx512.csv, ...), so the runs of two
    # levels never merge into one table.
    stem = f"cpu_{cpu_level.torch_level()}" if device.type == "cpu" else report.slug(name)
    base = os.path.join(out_dir, stem)
    csv_path, md_path = base + ".csv", base + "_summary.md"
    quick = args.quick or args.smoke
    ops = _csv_list(args.ops, OPS, "op", ALIASES)
    modes = _csv_list(args.modes, MODES, "mode")
    default_dtypes = ("bf16" if quick else "bf16,fp16,fp32") if device.type == "cuda" else \
        ("fp32" if args.smoke else "fp32,bf16")
    dtypes = [DTYPES[d] for d in _csv_list(args.dtypes or default_dtypes, tuple(DTYPES), "dtype")]
    scope = bf16_scope(args, device, native16)

    meta = {"device": name, "cpu_level": level, "torch": torch.__version__, "triton": triton_version(),
            "git_sha": git_sha(),
            "timestamp": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")}
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        where = f"{name}, {props.multi_processor_count} SMs, {props.total_memory / 2**30:.0f} GiB"
    else:
        load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
        # The load says whether other jobs shared the cores during the run.
        where = f"{_cpu_model()}, {torch.get_num_threads()} threads, load average {load:.1f} at start"
    header = [f"- device: {where}", *_level_lines(device, level, native16, scope),
              f"- torch {meta['torch']}, triton {meta['triton'] or '(none)'}, git {meta['git_sha']}, "
              f"latest run {meta['timestamp']}: `python -m bench {' '.join(argv if argv is not None else sys.argv[1:])}`",
              "- timing: " + ("CUDA events around each call, L2 flushed before each, providers interleaved "
                              "rep by rep" if device.type == "cuda" else
                              "wall clock per call, providers interleaved rep by rep, GC off")
              + "; warm-up (and compilation, autotuning) excluded; input sets rotated",
              "- peak MB: memory the call allocates beyond its live inputs, at its peak ("
              + ("torch.cuda.max_memory_allocated" if device.type == "cuda" else
                 "process RSS high-water mark after handing the free heap back, malloc_trim") + ")"]

    if args.report_only:
        rows = report.read_csv(csv_path)
        header = [f"- redrawn from {os.path.basename(csv_path)} (runs of "
                  f"{', '.join(sorted({r['timestamp'] for r in rows}))}; CPU level "
                  f"{', '.join(sorted({r.get('cpu_level') or '?' for r in rows}))})"]
        _write_reports(rows, out_dir, md_path, name, stem, header, [], [])
        return 0

    budget = budget_for(device, quick, args.reps, args.provider_budget)
    cases = build_cases(args, device, ops, modes, dtypes, budget, scope)
    runner = Runner(device, budget, meta, verbose=args.verbose)
    estimate = Estimator(cases, budget, runner._n_sets)
    first_guess = estimate.left(0)
    if args.list:
        for i, c in enumerate(cases):
            print(f"{c}  [{', '.join(p.name for p in c.providers)}]  ~{fmt_duration(estimate.predict(i))}")
        print(f"{len(cases)} cases; modelled run time ~{fmt_duration(first_guess)} (before any measurement)")
        return 0

    print(f"bench: {len(cases)} cases on {where}, CPU level {level}; modelled run time "
          f"~{fmt_duration(first_guess)} (refined as cases finish); writing {csv_path}", file=sys.stderr, flush=True)
    reset_compile()
    old = report.read_csv(csv_path)
    fresh = []

    def on_case(case_rows):
        # Saved after every case, so a run cut short still leaves its rows.
        fresh.extend(case_rows)
        report.write_csv(csv_path, report.merge(old, fresh))
        reset_compile()

    limit = args.time_limit
    if limit is None and not args.smoke:
        limit = (QUICK_LIMIT if args.quick else FULL_LIMIT)[device.type]
    progress = Progress(cases, estimate, enabled=not args.no_progress, time_limit=limit or None)
    runner.on_phase = progress.phase
    with progress:
        run_all(cases, runner, time_limit=limit or None, progress=progress, on_case=on_case)
        # The ceilings once more at the end: on a machine shared with other jobs the limit is
        # what it reached at its best during the run, so each ceiling keeps the faster of its
        # two rows. One row per ceiling provider (torch-mm and, on CPU fp32, onednn-mm).
        progress.phase("the ceilings again")
        ident = lambda r: (r["op"], r["provider"], r["dtype"], r["shape"])  # noqa: E731
        for case in [c for c in cases if c.op.startswith("ceiling")]:
            for row in runner.run(case):
                same = [r for r in fresh if ident(r) == ident(row)]
                if same and not row["skipped"] and (same[0]["skipped"] or float(row["ms_p20"]) < float(same[0]["ms_p20"])):
                    fresh[fresh.index(same[0])] = row
    took = progress.elapsed()
    header.append(_run_time_line(runner, cases, took, first_guess))
    if runner.reduced:
        header.append("- timed on one input set with fewer repetitions (over budget at the full count; "
                      "no peak MB): " + ", ".join(f"{c} {n} ({reps} reps, {est:.2g} s a call)"
                                                  for c, n, reps, est in runner.reduced))
    rows = report.merge(old, fresh)
    report.write_csv(csv_path, rows)
    late = [s for s in runner.skipped if s[2].startswith("time limit")]
    paths = _write_reports(rows, out_dir, md_path, name, stem, header, late, runner.mismatches)
    print(_console_table(fresh))
    goals = targets.table(fresh, device.type)
    if len(goals) > 2:
        print("\nthe issues' speed targets:\n" + "\n".join(goals))
    n_skip = sum(1 for r in fresh if r["skipped"])
    print(f"bench: {len(fresh)} rows ({n_skip} skipped providers) in {fmt_duration(took)}; wrote {csv_path}, "
          f"{md_path}" + "".join(f", {p}" for p in paths))
    return 0


def _run_time_line(runner, cases, took, first_guess):
    """How long the run took, with what it measured per case: the process's CPU time says how
    much of the wall time other jobs on the machine took (on a quiet machine of the same cores
    the run takes between CPU/threads and CPU time, parallel and serial work)."""
    ran = runner.case_times
    wall, cpu = sum(t[1] for t in ran), sum(t[2] for t in ran)
    slow = sorted(ran, key=lambda t: -t[1])[:5]
    line = (f"- run time: {fmt_duration(took)}; {len(ran)} of {len(cases)} cases ran, in "
            f"{fmt_duration(wall)} wall and {fmt_duration(cpu)} process CPU time on "
            f"{torch.get_num_threads()} threads (modelled at the start: ~{fmt_duration(first_guess)})")
    if slow:
        line += "; slowest: " + ", ".join(f"{c} {w:.0f} s" for c, w, _ in slow)
    setups = sorted(runner.setup_s.items(), key=lambda kv: -kv[1])
    if setups:
        line += "; first set-ups (compiling included): " + ", ".join(f"{n} {s:.0f} s" for n, s in setups)
    return line


def _write_reports(rows, out_dir, md_path, name, stem, header, late, mismatches):
    os.makedirs(out_dir, exist_ok=True)
    goals = targets.table(rows, "cpu" if name == "cpu" else "cuda")
    with open(md_path, "w") as f:
        f.write(report.summary(rows, name, header, late, mismatches, goals))
    return report.plots(rows, out_dir, name, stem)


def _console_table(rows):
    """A short table for the terminal: per case, best bigmodel against best torch."""
    lines = [f"{'op':<16} {'mode':<7} {'dtype':<5} {'shape':<44} {'bigmodel ms':>11} {'torch ms':>9} {'speed-up':>8}"]
    for (op, mode, dtype), shapes in report._groups(rows).items():
        for shape, rs in shapes.items():
            big = report._best(rs, "bigmodel", exclude=("bigmodel-reference",))
            tor = report._best(rs, "torch")
            bms = float(big["ms_p50"]) if big else float("nan")
            tms = float(tor["ms_p50"]) if tor else float("nan")
            ratio = f"{tms / bms:.2f}x" if big and tor else "-"
            lines.append(f"{op:<16} {mode:<7} {dtype:<5} {shape[:44]:<44} {bms:>11.4g} {tms:>9.4g} {ratio:>8}")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
