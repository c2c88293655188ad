"""Runs cases into CSV rows: set-up and warm-up per provider, then interleaved timing, then
one call more for peak memory. A provider that cannot run is recorded as skipped, with why.
"""
import dataclasses
import gc
import math
import sys
import time
import traceback

import torch

from bench.core import Skip
from bench.memory import peak_mb
from bench.timing import make_timer, quantiles

COLUMNS = ["op", "mode", "provider", "dtype", "shape", "device", "ms_p50", "ms_p20", "ms_p80",
           "tflops", "gbps", "peak_mem_mb", "torch", "triton", "git_sha", "timestamp"]


@dataclasses.dataclass
class Budget:
    """How long each case is timed: ``seconds`` of calls per provider, within [min_reps, max_reps]."""

    seconds: float
    min_reps: int
    max_reps: int
    input_sets: int = 3
    input_set_bytes: float = 1 << 30  # all input sets of a case together, at most
    warmup: int = 1  # timed warm-up calls after set-up


def budget_for(device, quick, reps=None):
    if device.type == "cuda":
        b = Budget(0.15, 10, 100, input_set_bytes=8 << 30, warmup=2) if quick else \
            Budget(0.5, 25, 300, input_set_bytes=8 << 30, warmup=2)
    else:
        b = Budget(0.2, 5, 30, input_sets=2) if quick else Budget(1.0, 7, 100)
    if reps is not None:
        b.min_reps = b.max_reps = reps
    return b


def _reason(err):
    first = (str(err).strip().splitlines() or [""])[0][:160] or type(err).__name__
    if isinstance(err, Skip):
        return first
    if isinstance(err, NotImplementedError):
        return f"not implemented: {first}"
    if isinstance(err, torch.cuda.OutOfMemoryError):
        return "out of memory"
    return f"error: {type(err).__name__}: {first}"


def _tolerance(dtype):
    return 2e-2 if dtype in (torch.float16, torch.bfloat16) else 5e-3


def _mismatch(out, ref, dtype):
    """Relative max error of one provider's forward output against the torch baseline's."""
    if not (isinstance(out, torch.Tensor) and isinstance(ref, torch.Tensor)) or out.shape != ref.shape:
        return None
    a, b = out.detach().double(), ref.detach().double()
    err = ((a - b).abs().max() / b.abs().max().clamp_min(1e-6)).item()
    return err if not (err <= _tolerance(dtype)) else None


class Runner:
    def __init__(self, device, budget, meta, verbose=False):
        self.device = device
        self.budget = budget
        self.meta = meta  # torch, triton, git_sha, timestamp, device name
        self.timer = make_timer(device)
        self.verbose = verbose
        self.skipped = []  # (case, provider, reason)
        self.mismatches = []  # (case, provider, relative error)

    def _n_sets(self, case):
        fit = int(self.budget.input_set_bytes // max(case.input_bytes, 1))
        return max(1, min(self.budget.input_sets, fit))

    def run(self, case):
        """Rows for one case (one per provider that ran)."""
        try:
            return self._run(case)
        finally:
            gc.collect()
            if self.device.type == "cuda":
                torch.cuda.empty_cache()

    def _skip(self, case, name, err):
        reason = _reason(err)
        self.skipped.append((case, name, reason))
        if self.verbose or reason.startswith("error"):
            tb = "".join(traceback.format_exception_only(type(err), err)).strip()
            print(f"\n[bench] {case} {name}: skipped ({tb[:300]})", file=sys.stderr)

    def _run(self, case):
        inputs = [case.make_inputs(1000 * i) for i in range(self._n_sets(case))]
        calls = {}
        for p in case.providers:
            try:
                calls[p.name] = [p.setup(inp, i) for i, inp in enumerate(inputs)]
            except Exception as err:  # noqa: BLE001 (every failure is reported, none stops the run)
                self._skip(case, p.name, err)
                if self.device.type == "cuda":
                    torch.cuda.empty_cache()
        if not calls:
            return []
        if case.mode == "fwd" and not case.op.startswith("ceiling"):
            self._check(case, calls)
        # Set-up ran every call once (compiling, autotuning); one or two more calls warm up
        # and give the per-call estimate that sizes the repetitions.
        estimates = {}
        for name in list(calls):
            try:
                estimates[name] = min(self.timer.once(calls[name][0]) for _ in range(self.budget.warmup))
            except Exception as err:  # noqa: BLE001
                self._skip(case, name, err)
                del calls[name]
        if not calls:
            return []
        per_round = sum(estimates.values())
        reps = int(min(self.budget.max_reps, max(self.budget.min_reps, self.budget.seconds * len(calls) / max(per_round, 1e-9))))
        samples = self.timer.measure(calls, reps, estimates)
        rows = []
        for name, fns in calls.items():
            p50, p20, p80 = quantiles(samples[name])
            try:
                mem = peak_mb(fns[0], self.device)
            except Exception:  # noqa: BLE001 (memory is a side figure; never lose the timing)
                mem = math.nan
            rows.append(self._row(case, name, p50, p20, p80, mem))
        return rows

    def _check(self, case, calls):
        torch_names = [n for n in calls if n.startswith("torch")]
        if not torch_names:
            return
        ref = calls[torch_names[0]][0]()
        for name in calls:
            if name.startswith("bigmodel") and not case.op.startswith("ceiling"):
                err = _mismatch(calls[name][0](), ref, case.dtype)
                if err is not None:
                    self.mismatches.append((case, name, err))
                    print(f"\n[bench] {case} {name}: output differs from {torch_names[0]} "
                          f"(relative max error {err:.3g})", file=sys.stderr)

    def _row(self, case, provider, p50, p20, p80, mem):
        # A ceiling is what the machine can reach: its rate comes from the p20 time (the least
        # disturbed calls); every other rate from the median.
        secs = max(p20 if case.op.startswith("ceiling") else p50, 1e-12)
        return {
            "op": case.op, "mode": case.mode, "provider": provider, "dtype": case.dtype_name,
            "shape": case.shape_str, "device": self.meta["device"],
            "ms_p50": f"{p50 * 1e3:.6g}", "ms_p20": f"{p20 * 1e3:.6g}", "ms_p80": f"{p80 * 1e3:.6g}",
            "tflops": f"{case.flops / secs / 1e12:.6g}" if case.flops else "",
            "gbps": f"{case.bytes / secs / 1e9:.6g}" if case.bytes else "",
            "peak_mem_mb": "" if math.isnan(mem) else f"{mem:.4g}",
            "torch": self.meta["torch"], "triton": self.meta["triton"],
            "git_sha": self.meta["git_sha"], "timestamp": self.meta["timestamp"],
        }


def run_all(cases, runner, time_limit=None, progress=True, on_case=None):
    """Runs ``cases`` in order with a progress bar; cases left when ``time_limit`` seconds have
    passed are recorded as skipped. ``on_case(rows)`` is called after each case (to save)."""
    from tqdm import tqdm

    start = time.perf_counter()
    rows = []
    bar = tqdm(cases, unit="case", disable=not progress, file=sys.stderr, dynamic_ncols=True,
               mininterval=1.0 if sys.stderr.isatty() else 15.0)
    for case in bar:
        if time_limit is not None and time.perf_counter() - start > time_limit:
            for p in case.providers:
                runner.skipped.append((case, p.name, f"time limit ({time_limit:.0f} s) reached"))
            continue
        bar.set_postfix_str(str(case)[:60], refresh=False)
        case_rows = runner.run(case)
        case.providers = []  # frees what providers keep between calls (models, optimizers, graphs)
        rows += case_rows
        if on_case is not None:
            on_case(case_rows)
    bar.close()
    return rows
