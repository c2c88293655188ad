"""bigmodel.nn.Linear: torch.nn.Linear whose CPU GEMMs run on bigmodel's engine."""
import torch
import torch.nn.functional as F

from bigmodel.nn._convert import sharing
from bigmodel.ops.fused_linear import fused_linear

# From this many multiply-adds (M * K * N) a call takes >= ~0.7 ms, so the engine's extra ~6 us
# (the op's dispatch and checks) is under 1% wherever its plan is torch's own GEMM call (Intel,
# DEFAULT, AVX2 below 1024 rows); below it small layers stay F.linear. Measured on the AVX-512
# EPYC, forward, engine / F.linear: 0.41x at 8x16->8, 0.65x at 1M, 1.20x at 4M, 1.81x at 16M
# (oneDNN); at AVX2 (MKL's call below 1024 rows) 0.90x at 4M, 0.96x at 16M, 0.98x at 32M, 1.12x at 64M.
ENGINE_MIN_MACS = 64 << 20


def cpu_engine_linear(x, weight, bias):
    """F.linear, on CPU tensors of at least ENGINE_MIN_MACS through bigmodel's engine
    (:func:`bigmodel.fused_linear` with no activation), which picks the GEMM library per CPU level:
    fwd+bwd at 2048 tokens on the AVX-512 EPYC 1.35-1.98x F.linear, AVX2 1.02-1.06x, DEFAULT
    0.99-1.00x (bench/NOTES.md, "Zen 5 again"). Elsewhere (CUDA, small layers) F.linear itself."""
    if x.is_cpu and x.numel() * weight.shape[0] >= ENGINE_MIN_MACS:
        return fused_linear(x, weight, bias, activation=None)
    return F.linear(x, weight, bias)


class Linear(torch.nn.Linear):
    r"""Drop-in :class:`torch.nn.Linear`: :math:`y = x A^T + b`, on CPU through bigmodel's engine.

    Same constructor, parameters, initialization, ``state_dict`` keys and ``repr`` as torch's (it
    subclasses it). On CPU tensors of at least ``ENGINE_MIN_MACS`` multiply-adds the product runs
    on :func:`bigmodel.fused_linear` with no activation (oneDNN where it beats MKL, the narrow
    kernel for a few outputs); otherwise, and on other devices, it is ``F.linear``.
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
