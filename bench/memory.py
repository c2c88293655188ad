"""Peak memory of one call, beyond the inputs already alive (outputs, workspace, saved
activations, gradients).

GPU: torch.cuda.max_memory_allocated over the call, minus what was allocated before it.
CPU: the process's resident-set high-water mark (VmHWM, reset through /proc/self/clear_refs)
over the call, minus the resident set before it. glibc would otherwise serve a freed large
block again without touching the RSS, so :func:`pin_malloc` fixes its mmap threshold at
128 KiB: every tensor bigger than that is its own mapping, mapped on allocation and returned
on free. Where /proc is not available the figure is left empty (NaN).
"""
import ctypes
import math
import sys

import torch

_M_MMAP_THRESHOLD = -3
_pinned = False


def pin_malloc():
    """Make large CPU allocations visible in the RSS (see the module docstring). Idempotent."""
    global _pinned
    if _pinned or not sys.platform.startswith("linux"):
        return
    try:
        ctypes.CDLL("libc.so.6").mallopt(_M_MMAP_THRESHOLD, 128 * 1024)
        _pinned = True
    except OSError:
        pass


def _status_bytes(key):
    with open("/proc/self/status") as f:
        for line in f:
            name, _, value = line.partition(":")
            if name == key:
                return int(value.split()[0]) * 1024
    raise KeyError(key)


def peak_mb(fn, device):
    """Extra memory at the peak of one call of ``fn``, in MiB (NaN where it can't be read)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        base = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        fn()
        torch.cuda.synchronize(device)
        return (torch.cuda.max_memory_allocated(device) - base) / 2**20
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets VmHWM to the current RSS
        base = _status_bytes("VmRSS")
        fn()
        return max(0, _status_bytes("VmHWM") - base) / 2**20
    except (OSError, KeyError):
        fn()
        return math.nan
