"""What a benchmark case is, and how a forward function becomes the call we time per mode.

A :class:`Case` is one (op, mode, dtype, shape) point. Its providers are measured together,
interleaved, on the same few input sets. A provider that cannot run there (not implemented
yet, unsupported dtype, no such backend on this device) is skipped with a reason; it never
stops the run.
"""
import contextlib
import dataclasses
from typing import Callable, Dict, List, Optional

import torch

MODES = ("fwd", "bwd", "fwd+bwd")
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
DTYPE_NAMES = {v: k for k, v in DTYPES.items()}


class Skip(Exception):
    """A provider that does not apply to a case (the reason is reported, not raised)."""


@dataclasses.dataclass
class Provider:
    """``setup(inputs, seed) -> fn``: builds the zero-argument call to time on one input set.

    ``setup`` runs once per input set before timing (compiles, autotunes, forward passes the
    backward needs); it may raise :class:`Skip` or NotImplementedError.
    """

    name: str
    setup: Callable[[list, int], Callable[[], object]]

    @property
    def is_torch(self):
        return self.name.startswith("torch")

    @property
    def is_bigmodel(self):
        return self.name.startswith("bigmodel")


@dataclasses.dataclass
class Case:
    op: str
    mode: str
    dtype: torch.dtype
    shape: Dict[str, object]  # ordered key=value pairs, e.g. M, K, N
    device: torch.device
    flops: float  # useful FLOPs of one call
    bytes: float  # minimum bytes one call must move (0 where not meaningful)
    make_inputs: Callable[[int], list]  # seed -> tensors
    providers: List[Provider]
    family: str = ""  # plot grouping: cases of one family share a plot, x = shape[x_key]
    x_key: Optional[str] = None
    input_bytes: float = 0.0  # bytes of one input set, to size how many sets fit
    priority: bool = False  # a shape an issue names as a target: measured first

    @property
    def shape_str(self):
        return ",".join(f"{k}={int(v) if isinstance(v, bool) else v}" for k, v in self.shape.items())

    @property
    def dtype_name(self):
        return DTYPE_NAMES[self.dtype]

    def __str__(self):
        return f"{self.op} {self.mode} {self.dtype_name} {self.shape_str}"


def skipped_provider(name, reason):
    """A provider that does not run here: every case reports it as skipped, with ``reason``."""
    def setup(inputs, seed):
        raise Skip(reason)

    return Provider(name, setup)


class InContext:
    """A zero-argument call that runs inside ``context()`` (e.g. bigmodel.use_backend). Calling it
    enters the context; the timers instead enter it once around each sample and call ``bare``,
    as a user sets a backend once around a loop, not around every layer: entered per call, the
    block cost the small shapes 20-30 us in the bench process (1024x256->10 fwd, 2026-12-03)."""

    def __init__(self, bare, context):
        self.bare, self.context = bare, context

    def __call__(self):
        with self.context():
            return self.bare()


def timed_call(forward, inputs, mode, context=contextlib.nullcontext, seed=0):
    """The call to time for ``forward(*inputs)`` in ``mode``, as an :class:`InContext`.

    fwd: the forward under no_grad. fwd+bwd: forward, then torch.autograd.grad of a fixed
    random output gradient with respect to every input that requires grad. bwd: the forward
    runs once here, outside the timing, and each call runs only the backward (retain_graph).
    ``context`` is in force around every call (e.g. bigmodel.use_backend), backward included.
    """
    if mode == "fwd":
        def run():
            with torch.no_grad():
                return forward(*inputs)

        call = InContext(run, context)
        call()  # fails here, during set-up, if the provider cannot run
        return call
    diff = [t for t in inputs if isinstance(t, torch.Tensor) and t.requires_grad]
    with context():
        out = forward(*inputs)
    gen = torch.Generator(device=out.device).manual_seed(seed)
    grad_out = torch.randn(out.shape, generator=gen, device=out.device, dtype=out.dtype)
    if mode == "bwd":
        def run():
            return torch.autograd.grad(out, diff, grad_out, retain_graph=True)
    elif mode == "fwd+bwd":
        del out

        def run():
            return torch.autograd.grad(forward(*inputs), diff, grad_out)
    else:
        raise ValueError(f"unknown mode {mode!r}; expected one of {MODES}")
    call = InContext(run, context)
    call()
    return call


def op_provider(name, forward, mode, context=contextlib.nullcontext):
    """A provider timing ``forward(*inputs)`` in ``mode`` (see :func:`timed_call`)."""
    return Provider(name, lambda inputs, seed: timed_call(forward, inputs, mode, context, seed))


def randn(shape, dtype, device, seed, requires_grad=False, scale=1.0):
    gen = torch.Generator(device=device).manual_seed(seed)
    t = torch.randn(shape, generator=gen, device=device, dtype=torch.float32 if dtype != torch.float64 else dtype)
    return (t * scale).to(dtype).requires_grad_(requires_grad)


def reset_compile():
    """Fresh torch.compile caches per case: each case's shapes compile statically, and the
    per-code-object recompile limit (8 by default) never silently drops a case to eager."""
    import torch._dynamo

    torch._dynamo.reset()
    for key in ("cache_size_limit", "recompile_limit", "accumulated_cache_size_limit",
                "accumulated_recompile_limit"):
        if hasattr(torch._dynamo.config, key):
            setattr(torch._dynamo.config, key, 4096)


def bigmodel_backends(device):
    """The bigmodel backends that run on ``device`` ('auto' is one of them, not measured twice)."""
    from bigmodel import backend

    names = [b for b in backend.BACKENDS if b != "auto"]
    if device.type == "cuda":
        return [b for b in names if b != "cpp"]
    # Triton on CPU tensors is its interpreter: a correctness tool, not a contender.
    return [b for b in names if b != "triton" and "cuda" not in b and "cublas" not in b]


def compile_modes(device, quick):
    """torch.compile modes to measure: default always; max-autotune on GPU outside --quick
    (without CUDA graphs, as no other provider uses them and bwd rows hold graph outputs)."""
    modes = [("torch-compile", "default")]
    if device.type == "cuda" and not quick:
        modes.append(("torch-compile-max-autotune", "max-autotune-no-cudagraphs"))
    return modes
