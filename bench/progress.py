"""Progress lines and the run-time estimate.

The estimate starts from a model of what a case costs (its FLOPs at a guessed rate, the calls
the budget asks of each provider, a guess for each torch.compile) and is corrected, as cases
finish, by the ratio of measured to modelled time: per (op, mode, dtype) once one such case
has run, over the whole run before that. A line is printed when a case starts (at most every
``every_s`` seconds) and, from a background thread, whenever nothing was printed for
``heartbeat_s`` seconds, so a long case still shows the run is alive.
"""
import math
import sys
import threading
import time

# Guessed sustained rates (FLOP/s) for the model; the measured correction does the rest.
RATE = {"cpu": 5e10, "cuda": 2e14}
CALL_OVERHEAD_S = {"cpu": 3e-5, "cuda": 1e-5}
COMPILE_GUESS_S = {"cpu": 6.0, "cuda": 20.0}  # one torch.compile (dynamo reset per case)
SAMPLE_MIN_S = 2e-3  # CpuTimer repeats calls shorter than this inside one sample


def model_seconds(case, budget, n_sets):
    """Modelled wall time of one case under ``budget`` (seconds), before any measurement."""
    kind = case.device.type
    t = case.flops / RATE.get(kind, RATE["cpu"]) + CALL_OVERHEAD_S.get(kind, 1e-5)
    reps = min(budget.max_reps, max(budget.min_reps, budget.seconds / t))
    sample = max(t, SAMPLE_MIN_S) if kind == "cpu" else t
    total = 0.0
    for p in case.providers:
        per = (n_sets + budget.warmup + 1 + (case.mode == "fwd")) * t + reps * sample
        if budget.provider_s:
            per = min(per, budget.provider_s + 2 * t)
        total += per + (COMPILE_GUESS_S.get(kind, 10.0) if "compile" in p.name else 0.0)
    return total


def fmt_duration(seconds):
    if seconds is None or math.isnan(seconds):
        return "?"
    seconds = int(round(seconds))
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m" if seconds >= 3600 else \
        f"{seconds // 60}m{seconds % 60:02d}s"


class Estimator:
    """Seconds left, from the model corrected by what the finished cases measured."""

    def __init__(self, cases, budget, n_sets):
        self.model = [model_seconds(c, budget, n_sets(c)) for c in cases]
        self.keys = [(c.op, c.mode, c.dtype_name) for c in cases]
        self.sums = {}  # key -> [measured s, modelled s]
        self.total = [0.0, 0.0]

    def _factor(self, key):
        measured, modelled = self.sums.get(key, self.total)
        return measured / modelled if modelled > 0 else 1.0

    def observe(self, i, seconds):
        # The ceilings (one huge GEMM, one copy) say little of the other cases' cost.
        shared = [] if self.keys[i][0].startswith("ceiling") else [self.total]
        for acc in [self.sums.setdefault(self.keys[i], [0.0, 0.0]), *shared]:
            acc[0] += seconds
            acc[1] += self.model[i]

    def predict(self, i):
        return self.model[i] * self._factor(self.keys[i])

    def left(self, start, in_case_s=0.0):
        """Seconds for cases start.. (the one running has been going for ``in_case_s``)."""
        if start >= len(self.model):
            return 0.0
        rest = sum(self.predict(j) for j in range(start + 1, len(self.model)))
        return rest + max(self.predict(start) - in_case_s, 0.0)


class Progress:
    """Prints ``bench [i/n] elapsed, ~left | case: phase`` lines to ``stream``."""

    def __init__(self, cases, estimator, stream=None, every_s=10.0, heartbeat_s=20.0, enabled=True,
                 time_limit=None):
        self.cases, self.est, self.time_limit = cases, estimator, time_limit
        self.stream = stream or sys.stderr
        self.every_s, self.heartbeat_s, self.enabled = every_s, heartbeat_s, enabled
        self.t0 = time.perf_counter()
        self.last_print = -math.inf
        self.index, self.case_t0, self.phase_text = 0, self.t0, "starting"
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._thread = None

    def __enter__(self):
        self.start()
        return self

    def __exit__(self, *exc):
        self.close()

    def start(self):
        self.t0 = self.case_t0 = time.perf_counter()
        if not self.enabled:
            return
        self.line(force=True)
        self._thread = threading.Thread(target=self._beat, name="bench-progress", daemon=True)
        self._thread.start()

    def _beat(self):
        while not self._stop.wait(min(1.0, self.heartbeat_s / 4)):
            if time.perf_counter() - self.last_print >= self.heartbeat_s:
                self.line(force=True)

    def close(self):
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)

    def case_start(self, i, case):
        self.index, self.case_t0, self.phase_text = i, time.perf_counter(), "set-up"
        self.line()

    def phase(self, text):
        self.phase_text = text

    def case_done(self, i, case, seconds, ran=True):
        if ran:
            self.est.observe(i, seconds)
        self.index = i + 1

    def elapsed(self):
        return time.perf_counter() - self.t0

    def line(self, force=False):
        """Prints the progress line (unless one went out less than ``every_s`` ago)."""
        if not self.enabled:
            return
        with self._lock:
            now = time.perf_counter()
            if not force and now - self.last_print < self.every_s:
                return
            self.last_print = now
            n, i = len(self.cases), self.index
            left = self.est.left(i, now - self.case_t0 if i < n else 0.0)
            where = f" | {self.cases[i]}: {self.phase_text}" if i < n else ""
            cut = ""
            if self.time_limit and now - self.t0 + left > self.time_limit:
                cut = f" (no case starts after {fmt_duration(self.time_limit)})"
            print(f"bench [{min(i, n)}/{n}] {fmt_duration(now - self.t0)} elapsed, "
                  f"~{fmt_duration(left)} left{cut}{where}"[:220], file=self.stream, flush=True)
