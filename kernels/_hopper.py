"""The Hopper (sm_90) features behind the kernels' extra autotune candidates, and the launcher's
rules for when a call may use them.

Tensor descriptors (``tl.make_tensor_descriptor``: tile loads and stores by the TMA copy engine,
which zero-fills and clips at the tensor's bounds) and warp specialisation
(``tl.range(..., warp_specialize=True)``: producer warps issue the copies while consumer warp
groups run the dots) are detected on the installed Triton; a config needing a feature this
Triton lacks is left out of the autotuner's candidates and listed in :data:`SKIPPED`.

Every config carries TMA and WS flags. A launch lets the autotuner choose within one *family*
of them; ``BIGMODEL_TRITON_VARIANT`` picks it:
  ``auto``    (default) ``all`` configs on sm_90+ when the tensors suit TMA, else ``plain``
              (always ``plain`` under the interpreter, whose autotuning would only cost time);
  ``plain``   the pointer kernels only (every GPU, and the interpreter);
  ``hopper``  the descriptor configs only, warp-specialised or not;
  ``tma``     the descriptor configs that are not warp-specialised;
  ``tma_ws``  the warp-specialised descriptor configs (the kernel's plain-TMA ones where it has
              none, as the backward kernels);
the last three for tests and the device check's per-variant timings, and an error where the
device, the Triton or the tensors cannot take them.
"""
import inspect
import os

import torch
import triton
import triton.language as tl

from bigmodel.kernels._common import INTERPRETED

VARIANT_ENV = "BIGMODEL_TRITON_VARIANT"
HAS_TENSOR_DESCRIPTORS = hasattr(tl, "make_tensor_descriptor")
HAS_WARP_SPECIALIZE = "warp_specialize" in inspect.signature(tl.range).parameters

SKIPPED = []  # (kernel, config, what this Triton lacks) for every Hopper config left out


def missing_features(tma=False, ws=False):
    """The Triton features a variant needs that the installed Triton lacks."""
    out = []
    if tma and not HAS_TENSOR_DESCRIPTORS:
        out.append("tl.make_tensor_descriptor")
    if ws and not HAS_WARP_SPECIALIZE:
        out.append("tl.range(..., warp_specialize=True)")
    return out


def supported(kernel, configs):
    """``configs`` without the Hopper ones this Triton cannot build (recorded in SKIPPED)."""
    kept = []
    for c in configs:
        missing = missing_features(c.kwargs.get("TMA", False), c.kwargs.get("WS", False))
        if missing:
            SKIPPED.append((kernel, str(c), f"needs {', '.join(missing)} (triton {triton.__version__})"))
        else:
            kept.append(c)
    return kept


POLICIES = ("auto", "plain", "hopper", "tma", "tma_ws")


def select(configs, family, warp_specialize=True):
    """The configs of ``family``: 'all', or one of the forced policies but 'auto'. Without
    ``warp_specialize`` (a launch the kernel's warp-specialised configs cannot take) those
    configs are left out, and 'tma_ws' means the kernel's plain-TMA ones."""
    if not warp_specialize:
        configs = [c for c in configs if not c.kwargs.get("WS", False)]
    if family == "all":
        return list(configs)
    if family == "plain":
        return [c for c in configs if not c.kwargs.get("TMA", False)]
    tma = [c for c in configs if c.kwargs.get("TMA", False)]
    if family == "hopper":
        return tma
    ws = [c for c in tma if c.kwargs.get("WS", False)]
    if family == "tma_ws":
        return ws or tma
    return [c for c in tma if not c.kwargs.get("WS", False)]


def _tma_ready(t):
    # The kernels describe each (rows, last dim) matrix of t to the TMA engine: unit stride along
    # the last dim, a positive 16-byte multiple between rows (whatever the row count: the
    # descriptor encodes it), and a 16-byte aligned base for every matrix (so the leading dims'
    # strides, zero for a broadcast dim, must be 16-byte multiples too).
    elt = t.element_size()
    if t.data_ptr() % 16 or (t.shape[-1] > 1 and t.stride(-1) != 1):
        return False
    if t.stride(-2) <= 0 or t.stride(-2) * elt % 16:
        return False
    return all(n == 1 or s * elt % 16 == 0 for n, s in zip(t.shape[:-2], t.stride()[:-2]))


_CAPABILITY = {}


def _hopper_device(device):
    if INTERPRETED:
        return device.type == "cpu"
    if device.type != "cuda":
        return False
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index not in _CAPABILITY:
        _CAPABILITY[index] = torch.cuda.get_device_capability(index)
    return _CAPABILITY[index][0] >= 9


def family(where, tensors):
    """The config family a launch over ``tensors`` (the inputs and outputs its Hopper variants
    would address through descriptors) may use; see the module docstring."""
    policy = os.environ.get(VARIANT_ENV, "auto")
    if policy not in POLICIES:
        raise ValueError(f"{where}: {VARIANT_ENV} must be one of {', '.join(POLICIES)}; got {policy!r}")
    if policy == "plain" or (policy == "auto" and INTERPRETED):
        return "plain"
    device = tensors[0].device
    features = HAS_TENSOR_DESCRIPTORS
    ready = features and _hopper_device(device) and all(_tma_ready(t) for t in tensors)
    if policy == "auto":
        return "all" if ready else "plain"
    if not ready:
        why = (f"this Triton ({triton.__version__}) has no tensor descriptors" if not features else
               f"{device} is not an sm_90+ GPU" if not _hopper_device(device) else
               "a tensor is not TMA-aligned (unit last stride, 16-byte aligned base and strides): "
               + ", ".join(f"{tuple(t.shape)} strides {t.stride()}" for t in tensors if not _tma_ready(t)))
        raise ValueError(f"{where}: {VARIANT_ENV}={policy}, but {why}")
    return policy


def _torch_scratch(size, alignment, stream):
    return torch.empty(size, device="cuda", dtype=torch.int8)


def ensure_allocator():
    """Device-side descriptors are written to a global scratch buffer that the launch allocates
    through triton's allocator (a ContextVar: per thread and task). Install one backed by
    torch's caching allocator unless the caller has set their own."""
    if INTERPRETED:
        return
    try:
        from triton.runtime import _allocation

        unset = isinstance(_allocation._allocator.get(), _allocation.NullAllocator)
    except (ImportError, AttributeError):  # a Triton without that module layout: always set ours
        unset = True
    if unset:
        triton.set_allocator(_torch_scratch)
