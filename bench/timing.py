"""Interleaved timers: providers alternate rep by rep, so drift (clocks, a neighbour's load)
hits them alike, and each rep uses the next input set, so no provider runs on warm caches
its rivals don't get. Each rep runs the providers in its own shuffled order (_rep_order), so
each one follows every other about equally often: a rotation of one fixed order had each
provider run after the same neighbour in all but one rep in n, and what a neighbour leaves
behind (its heap, its threads, its cache lines) fell on one provider alone.

GPU: CUDA events around each call, with a 256 MB buffer zeroed before every call to evict
the L2 (what triton.testing.do_bench does), all events read after one synchronize.
CPU: wall clock (perf_counter) around each call, garbage collection off while timing.
A provider's context (bench.core.InContext: its backend) is entered around each sample, not
timed with each call.
"""
import contextlib
import gc
import math
import random
import time

import torch


def quantiles(samples):
    """(p50, p20, p80) of a list of times, linear interpolation between ranks."""
    xs = sorted(samples)

    def q(p):
        pos = p * (len(xs) - 1)
        lo, hi = math.floor(pos), math.ceil(pos)
        return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)

    return q(0.5), q(0.2), q(0.8)


def _context_and_calls(fns):
    """(the context to enter around a sample, the calls to make inside it): a provider whose
    calls all carry one context (bench.core.InContext) enters it once per sample."""
    contexts = {getattr(f, "context", None) for f in fns}
    if len(contexts) == 1 and None not in contexts:
        return contexts.pop(), [f.bare for f in fns]
    return contextlib.nullcontext, fns


def _rep_order(names, r):
    """The providers in rep r's order: a shuffle seeded by r (the same every run)."""
    order = list(names)
    random.Random(r).shuffle(order)
    return order


def _most(names, reps, caps):
    """Samples per provider: ``reps``, or fewer where ``caps`` says so (a slow provider's)."""
    return {n: min(reps, (caps or {}).get(n) or reps) for n in names}


class CpuTimer:
    """Seconds per call by wall clock. Calls shorter than ``min_sample_s`` are repeated inside
    one sample (cycling the input sets) so the timer's resolution doesn't matter."""

    def __init__(self, min_sample_s=2e-3):
        self.min_sample_s = min_sample_s

    def sync(self):
        pass

    def once(self, fn):
        t0 = time.perf_counter()
        fn()
        return time.perf_counter() - t0

    def measure(self, calls, reps, estimates, caps=None):
        """``calls``: name -> list of zero-arg calls (one per input set); ``caps``: name -> the
        most samples that provider takes (None: ``reps``); returns name -> samples (s)."""
        names = list(calls)
        most = _most(names, reps, caps)
        inner = {n: max(1, math.ceil(self.min_sample_s / max(estimates[n], 1e-9))) for n in names}
        samples = {n: [] for n in names}
        prepared = {n: _context_and_calls(calls[n]) for n in names}
        was_enabled = gc.isenabled()
        gc.disable()
        try:
            for r in range(reps):
                for n in _rep_order(names, r):
                    if len(samples[n]) >= most[n]:
                        continue
                    (context, fns), k = prepared[n], inner[n]
                    with context():
                        t0 = time.perf_counter()
                        for i in range(k):
                            fns[(r * k + i) % len(fns)]()
                        samples[n].append((time.perf_counter() - t0) / k)
        finally:
            if was_enabled:
                gc.enable()
        return samples


class CudaTimer:
    """Seconds per call by CUDA events, L2 flushed before each call."""

    def __init__(self, device):
        self.device = device
        self.flush_buf = torch.empty(256 * 2**20, dtype=torch.int8, device=device)

    def sync(self):
        torch.cuda.synchronize(self.device)

    def once(self, fn):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        self.flush_buf.zero_()
        start.record()
        fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / 1e3

    def measure(self, calls, reps, estimates, caps=None):
        names = list(calls)
        most = _most(names, reps, caps)
        events = {n: [] for n in names}
        prepared = {n: _context_and_calls(calls[n]) for n in names}
        for r in range(reps):
            for n in _rep_order(names, r):
                if len(events[n]) >= most[n]:
                    continue
                context, fns = prepared[n]
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                self.flush_buf.zero_()
                with context():
                    start.record()
                    fns[r % len(fns)]()
                    end.record()
                events[n].append((start, end))
        self.sync()
        return {n: [s.elapsed_time(e) / 1e3 for s, e in ev] for n, ev in events.items()}


def make_timer(device):
    return CudaTimer(device) if device.type == "cuda" else CpuTimer()
