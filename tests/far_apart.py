"""Tensors whose elements lie 2**31 elements apart, for proving that kernels form pointer offsets
in int64, without allocating 2**31 elements.

What the tests using it prove: every pointer offset a kernel forms from a tensor's strides (row,
column, batch, head and mask offsets, forward and backward, both ops) is computed in int64, for
each tensor the kernels read or write through strides. Offsets into the Triton launchers' own
contiguous buffers (attention's lse and delta, (b * H + h) * L + i) start from an int64 b;
reaching 2**31 there needs B * H * L > 2**31 programs' worth of rows, which the interpreter
cannot run: that part rests on reading kernels/attention.py. The C++ engine indexes through
at::Tensor's int64 strides.
"""
import mmap
import platform

import pytest
import torch


def far_apart(values, dim, gap, base=2**31):
    """A view equal to ``values`` whose ``dim`` has stride ``gap`` (the other dims packed), over a
    storage that spans ``base + extent`` elements but costs only the pages the view touches.

    The storage is an anonymous MAP_NORESERVE mapping: untouched pages are never allocated (reads
    would map the kernel's shared zero page), so a 16 GiB span costs a few KiB of memory. The view
    starts at element ``base`` = 2**31, so where an offset in [2**31, 2**32) wrapped to int32 it
    would land, 2**32 elements earlier, inside the mapping too: on a zero, not on a segfault. A
    kernel computing offsets in int32 then returns wrong values, which the test sees.
    """
    shape = list(values.shape)
    inner = [s for i, s in enumerate(shape) if i != dim]
    packed, acc = [], 1
    for s in reversed(inner):
        packed.insert(0, acc)
        acc *= s
    assert acc <= gap, "the packed dims must fit between two entries of the far dim"
    strides = packed[:dim] + [gap] + packed[dim:]
    extent = 1 + sum((n - 1) * s for n, s in zip(shape, strides))
    flags = mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | _MAP_NORESERVE
    region = mmap.mmap(-1, (base + extent) * values.element_size(), flags=flags)
    view = torch.frombuffer(region, dtype=values.dtype)[base:].as_strided(shape, strides)
    view.copy_(values)
    return view


# Python < 3.12 lacks the constant; 0x4000 is MAP_NORESERVE on x86-64 and arm64 Linux.
_MAP_NORESERVE = getattr(mmap, "MAP_NORESERVE", 0x4000)
GAP = 2**30 + 4096  # entry 2 of the far dim sits at 2**31 + 8192: past int32, inside the mapping


def _rss_mib():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * mmap.PAGESIZE / 2**20


@pytest.fixture
def small_footprint():
    """The far-apart views must cost pages, not GiB: resident memory grows by < 512 MiB."""
    assert platform.system() == "Linux", "the far-apart views need Linux's MAP_NORESERVE"
    before = _rss_mib()
    yield
    assert _rss_mib() - before < 512, f"resident memory grew by {_rss_mib() - before:.0f} MiB"
