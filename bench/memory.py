"""Peak memory of one call, beyond the inputs already alive (outputs, workspace, saved
activations, gradients).

GPU: torch.cuda.max_memory_allocated over the call, minus what was allocated before it.
CPU: the process's resident-set high-water mark (VmHWM, reset through /proc/self/clear_refs)
over the call, minus the resident set before it. glibc would otherwise serve a freed block
again without the RSS moving, so the heap's free memory is first handed back to the kernel
(malloc_trim(0)): a block the call reuses is faulted in again and counted. Where /proc is not
available the figure is left empty (NaN).

The allocator itself is left as it is. An earlier version pinned glibc's mmap threshold at
128 KiB for the whole run, which made every large tensor a fresh mapping with its page faults,
in the timings too: it slowed the seed's MLP training step from 13.8 to 19.7 ms and flattered
whichever provider allocates less (eager / FusedLinearReLU 1.05x pinned, 0.99x as users run it).
"""
import ctypes
import math
import sys

import torch


def _release_free_heap():
    if sys.platform.startswith("linux"):
        try:
            ctypes.CDLL("libc.so.6").malloc_trim(0)
        except (OSError, AttributeError):
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
    _release_free_heap()
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets VmHWM to the current RSS
        base = _status_bytes("VmRSS")
        fn()
        return max(0, _status_bytes("VmHWM") - base) / 2**20
    except (OSError, KeyError):
        fn()
        return math.nan
