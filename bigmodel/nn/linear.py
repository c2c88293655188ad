"""bigmodel.nn.Linear: torch.nn.Linear whose CPU GEMMs run on bigmodel's engine."""
import torch
import torch.nn.functional as F

from bigmodel.nn._convert import sharing
from bigmodel.ops import _registry
from bigmodel.ops.fused_linear import fused_linear

# Where a plain Linear (no activation) runs on bigmodel's engine instead of F.linear, as the
# engine's C++ plan answers for this CPU and level (csrc/cpu/linear_relu.cpp,
# plain_linear_min_macs; csrc/cpu/linear_narrow.h, narrow_max_n and kNarrowMinK), read once at
# import: ATen fixes its capability at start-up, and constants keep torch.compile's graph whole.
#  * ENGINE_MIN_MACS: from this many multiply-adds (M * K * N). 8M on an AMD CPU at AVX512, where
#    the plan has oneDNN from a few MFLOP (engine / F.linear, Zen 5, fwd / fwd+bwd: 0.87-1.11 /
#    1.03-1.21x at 4M, 1.25 / 1.38x at 8M, 1.72 / 1.61x at 16M); else 64M, where the engine's extra ~6 us (the op's dispatch and
#    checks) is under 1% wherever its plan is torch's own GEMM call (Intel, DEFAULT, AVX2 below
#    1024 rows; at AVX2 0.90x at 4M, 0.96x at 16M, 1.12x at 64M).
#  * A narrow layer (a classifier's last Linear: the seed MLP's 256 -> 10), at most
#    NARROW_MAX_OUT outputs (14 at AVX512, 11 at AVX2, 0 at DEFAULT, which has no narrow kernel)
#    and NARROW_MIN_IN inputs, runs on the engine's narrow kernels from NARROW_MIN_MACS: Zen 5,
#    engine / F.linear, fwd / fwd+bwd, 1024x256->10 AVX512 3.59 / 2.04x, AVX2 2.20 / 1.71x
#    (DEFAULT 0.90 / 0.96x); 64x256->10 (164K) 0.89-1.02 / 1.09-1.13x; 256x256->1 (65K)
#    0.64-0.72 / 0.79-0.94x, the op's fixed cost.
if _registry.has_ops():
    ENGINE_MIN_MACS = _registry._C.cpu_plain_linear_min_macs()
    NARROW_MAX_OUT = _registry._C.cpu_narrow_max_out()
    NARROW_MIN_IN = _registry._C.cpu_narrow_min_in()
else:  # no extension: fused_linear raises ExtensionNotBuilt, as for every other op
    ENGINE_MIN_MACS, NARROW_MAX_OUT, NARROW_MIN_IN = 64 << 20, 0, 16
NARROW_MIN_MACS = 1 << 19


def cpu_engine_linear(x, weight, bias):
    """F.linear, on CPU through bigmodel's engine (:func:`bigmodel.fused_linear` with no
    activation) where that measured faster: tensors of at least ENGINE_MIN_MACS, where the engine
    picks the GEMM library per CPU level (fwd+bwd at 2048 tokens on the AVX-512 EPYC 1.35-1.98x
    F.linear, AVX2 1.02-1.06x, DEFAULT 0.99-1.00x; bench/NOTES.md, "Zen 5 again"), and narrow
    layers from NARROW_MIN_MACS. Elsewhere (CUDA, small layers) F.linear itself."""
    if x.is_cpu:
        out_features, in_features = weight.shape
        macs = x.numel() * out_features
        narrow = out_features <= NARROW_MAX_OUT and in_features >= NARROW_MIN_IN and macs >= NARROW_MIN_MACS
        if macs >= ENGINE_MIN_MACS or narrow:
            return fused_linear(x, weight, bias, activation=None)
    return F.linear(x, weight, bias)


class Linear(torch.nn.Linear):
    r"""Drop-in :class:`torch.nn.Linear`: :math:`y = x A^T + b`, on CPU through bigmodel's engine.

    Same constructor, parameters, initialization, ``state_dict`` keys and ``repr`` as torch's (it
    subclasses it). On CPU tensors of at least ``ENGINE_MIN_MACS`` multiply-adds, and on narrow
    layers (at most ``NARROW_MAX_OUT`` outputs, from ``NARROW_MIN_MACS``), the product runs on
    :func:`bigmodel.fused_linear` with no activation (oneDNN where it beats MKL, the narrow
    kernels for a few outputs); otherwise, and on other devices, it is ``F.linear``.
    Use :meth:`from_torch` to convert an existing layer without copying its parameters.
    """

    @classmethod
    def from_torch(cls, linear):
        """A :class:`Linear` sharing ``linear``'s parameters, buffers and hooks."""
        if not isinstance(linear, torch.nn.Linear):
            raise TypeError(f"Linear.from_torch: linear must be a torch.nn.Linear, got {type(linear).__name__}")
        return sharing(cls, linear)

    def forward(self, input):
        return cpu_engine_linear(input, self.weight, self.bias)
