"""Runs cases into CSV rows: set-up and warm-up per provider, then interleaved timing, then
one call more for peak memory. A provider that cannot run is recorded as skipped, with why,
in a row of its own (timings empty, the reason in ``skipped``). So is one whose first timed
call says its repetitions would take longer than the budget allows ("over budget"): one slow
provider (torch's bf16 GEMM on a CPU without bf16 arithmetic) cannot stall the run.
"""
import dataclasses
import gc
import math
import os
import sys
import time
import traceback
from typing import Optional

import torch

from bench.core import Skip
from bench.memory import peak_mb
from bench.timing import make_timer, quantiles

# cpu_level: the CPU capability the row ran at (bench.cpu_level.describe); skipped: why a
# provider has no timings (empty on measured rows).
COLUMNS = ["op", "mode", "provider", "dtype", "shape", "device", "cpu_level", "ms_p50", "ms_p20",
           "ms_p80", "tflops", "gbps", "peak_mem_mb", "torch", "triton", "git_sha", "timestamp",
           "skipped"]


@dataclasses.dataclass
class Budget:
    """How long each case is timed: ``seconds`` of calls per provider, within [min_reps, max_reps].

    ``provider_s``: the most one provider's calls in a case may take (set-up of the other input
    sets, repetitions, the memory call), judged from its first timed call. A provider that
    would take longer runs on one input set with fewer repetitions (at least ``floor_reps``,
    no memory call); one that cannot fit even those is skipped as over budget. None: no limit.
    """

    seconds: float
    min_reps: int
    max_reps: int
    input_sets: int = 3
    input_set_bytes: float = 1 << 30  # all input sets of a case together, at most
    warmup: int = 1  # timed warm-up calls after set-up
    provider_s: Optional[float] = None
    floor_reps: int = 3


def budget_for(device, quick, reps=None, provider_s=None):
    """The timing budget per device and run length; ``provider_s`` 0 lifts the per-provider limit."""
    if device.type == "cuda":
        b = Budget(0.15, 10, 100, input_set_bytes=8 << 30, warmup=2, provider_s=30.0) if quick else \
            Budget(0.5, 25, 300, input_set_bytes=8 << 30, warmup=2, provider_s=60.0)
    else:
        # Half a second of calls per provider: on CPU the spread comes from the machine, not
        # from the count, and the full run must fit 25 minutes on 2 cores.
        b = Budget(0.2, 5, 30, input_sets=2, provider_s=8.0) if quick else Budget(0.5, 7, 100, provider_s=20.0)
    if reps is not None:
        b.min_reps = b.max_reps = reps
    if provider_s is not None:
        b.provider_s = provider_s or None
    return b


class OverBudget(Skip):
    """A provider whose calls would take longer than Budget.provider_s."""


def _secs(s):
    return f"{s * 1e3:.3g} ms" if s < 1 else f"{s:.3g} s"


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
    def __init__(self, device, budget, meta, verbose=False, on_phase=None):
        self.device = device
        self.budget = budget
        self.meta = meta  # torch, triton, git_sha, timestamp, device name, cpu_level
        self.timer = make_timer(device)
        self.verbose = verbose
        self.on_phase = on_phase or (lambda text: None)  # what the runner is doing (progress)
        self.skipped = []  # (case, provider, reason)
        self.mismatches = []  # (case, provider, relative error)
        self.case_times = []  # (case, wall s, process CPU s): what the run-time estimates use
        self.setup_s = {}  # provider -> seconds in its first set-ups (compiling, autotuning)
        self.reduced = []  # (case, provider, repetitions, first call s): timed with fewer reps

    def _n_sets(self, case):
        fit = int(self.budget.input_set_bytes // max(case.input_bytes, 1))
        return max(1, min(self.budget.input_sets, fit))

    def run(self, case):
        """Rows for one case: one per provider, measured or skipped."""
        try:
            return self._run(case)
        finally:
            gc.collect()
            if self.device.type == "cuda":
                torch.cuda.empty_cache()

    def _skip(self, case, name, err, rows):
        reason = _reason(err)
        self.skipped.append((case, name, reason))
        rows.append(self._row(case, name, skipped=reason))
        if self.verbose or reason.startswith("error"):
            tb = "".join(traceback.format_exception_only(type(err), err)).strip()
            print(f"\n[bench] {case} {name}: skipped ({tb[:300]})", file=sys.stderr)

    def _prepare(self, case, provider, inputs):
        """Set-up on the first input set, the warm-up calls (the per-call estimate), then the
        budget check, then set-up on the other sets: (calls, estimate, most repetitions or
        None for as many as the case's)."""
        t0 = time.perf_counter()
        first = provider.setup(inputs[0], 0)
        self.setup_s[provider.name] = self.setup_s.get(provider.name, 0.0) + time.perf_counter() - t0
        # Set-up ran the call once (compiling, autotuning); the warm-up calls are warm.
        est = min(self.timer.once(first) for _ in range(self.budget.warmup))
        limit = self.budget.provider_s
        # The calls still to come: the other sets' set-up, the repetitions, the memory call
        # and, for a forward, the output check.
        check = int(case.mode == "fwd")
        n = len(inputs) - 1 + self.budget.min_reps + 1 + check
        if not limit or est * n <= limit:
            return [first] + [provider.setup(inp, i) for i, inp in enumerate(inputs[1:], 1)], est, None
        # Too slow for the full count: one input set, what fits of the repetitions, no memory call.
        fit = min(self.budget.min_reps, int(limit // est) - check)
        floor = min(self.budget.floor_reps, self.budget.min_reps)
        if fit < floor:
            n = floor + check
            raise OverBudget(f"over budget: first timed call {_secs(est)}, so even {n} calls need "
                             f"~{_secs(est * n)} (budget {_secs(limit)} per provider)")
        self.reduced.append((case, provider.name, fit, est))
        return [first], est, fit

    def _run(self, case):
        inputs = [case.make_inputs(1000 * i) for i in range(self._n_sets(case))]
        calls, estimates, caps, rows = {}, {}, {}, []
        for p in case.providers:
            self.on_phase(f"{p.name} set-up")
            try:
                calls[p.name], estimates[p.name], caps[p.name] = self._prepare(case, p, inputs)
            except Exception as err:  # noqa: BLE001 (every failure is reported, none stops the run)
                self._skip(case, p.name, err, rows)
                if self.device.type == "cuda":
                    torch.cuda.empty_cache()
        if not calls:
            return rows
        if case.mode == "fwd" and not case.op.startswith("ceiling"):
            self._check(case, calls)
        per_round = sum(estimates.values())
        reps = int(min(self.budget.max_reps, max(self.budget.min_reps, self.budget.seconds * len(calls) / max(per_round, 1e-9))))
        self.on_phase(f"timing {len(calls)} providers x {reps} reps")
        samples = self.timer.measure(calls, reps, estimates, caps)
        measured = []
        for name, fns in calls.items():
            p50, p20, p80 = quantiles(samples[name])
            try:
                mem = math.nan if caps[name] else peak_mb(fns[0], self.device)
            except Exception:  # noqa: BLE001 (memory is a side figure; never lose the timing)
                mem = math.nan
            measured.append(self._row(case, name, p50, p20, p80, mem))
        return measured + rows

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

    def _row(self, case, provider, p50=math.nan, p20=math.nan, p80=math.nan, mem=math.nan, skipped=""):
        # A ceiling is what the machine can reach: its rate comes from the p20 time (the least
        # disturbed calls); every other rate from the median.
        secs = max(p20 if case.op.startswith("ceiling") else p50, 1e-12)
        ms = lambda s: "" if math.isnan(s) else f"{s * 1e3:.6g}"  # noqa: E731
        timed = not skipped
        return {
            "op": case.op, "mode": case.mode, "provider": provider, "dtype": case.dtype_name,
            "shape": case.shape_str, "device": self.meta["device"], "cpu_level": self.meta.get("cpu_level", ""),
            "ms_p50": ms(p50), "ms_p20": ms(p20), "ms_p80": ms(p80),
            "tflops": f"{case.flops / secs / 1e12:.6g}" if case.flops and timed else "",
            "gbps": f"{case.bytes / secs / 1e9:.6g}" if case.bytes and timed else "",
            "peak_mem_mb": "" if math.isnan(mem) else f"{mem:.4g}",
            "torch": self.meta["torch"], "triton": self.meta["triton"],
            "git_sha": self.meta["git_sha"], "timestamp": self.meta["timestamp"], "skipped": skipped,
        }


def _cpu_seconds():
    """CPU time of this process, all threads (user + system)."""
    t = os.times()
    return t.user + t.system


def run_all(cases, runner, time_limit=None, progress=None, on_case=None):
    """Runs ``cases`` in order; cases left when ``time_limit`` seconds have passed are recorded
    as skipped (in ``runner.skipped``, not as rows: a run cut short keeps the older rows of the
    cases it did not reach). ``progress`` (a bench.progress.Progress) hears of every case;
    ``on_case(rows)`` is called after each case (to save)."""
    start = time.perf_counter()
    rows = []
    for i, case in enumerate(cases):
        if time_limit is not None and time.perf_counter() - start > time_limit:
            for p in case.providers:
                runner.skipped.append((case, p.name, f"time limit ({time_limit:.0f} s) reached"))
            if progress is not None:
                progress.case_done(i, case, 0.0, ran=False)
            continue
        if progress is not None:
            progress.case_start(i, case)
        t0, cpu0 = time.perf_counter(), _cpu_seconds()
        case_rows = runner.run(case)
        runner.case_times.append((case, time.perf_counter() - t0, _cpu_seconds() - cpu0))
        if not case.op.startswith("ceiling"):  # the ceilings run again at the end
            case.providers = []  # frees what providers keep between calls (models, optimizers, graphs)
        rows += case_rows
        if progress is not None:
            progress.case_done(i, case, time.perf_counter() - t0)
        if on_case is not None:
            on_case(case_rows)
    return rows
