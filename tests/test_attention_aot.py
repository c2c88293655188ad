"""Every attention Triton config compiles ahead of time for sm_90 with the venv's Triton and with
the H200's (3.6): fp16, bf16 and fp32 (tf32, and without for the forward), head dims 64, 128 and
256, the feature variants (masks, dropout, padded head dims), plain and Hopper variants. The
configs the autotuners may pick for fp16/bf16 at head dims 64 and 128 pass the static rules: no
spills, every 16-bit dot on wgmma, shared memory within 227 KB, TMA and warp specialisation where
the variant says so (bench/sm90.py; the machinery is bench/aot.py)."""
import pytest
import torch

from bench import sm90
from bigmodel.kernels import attention as A


@pytest.mark.parametrize("which", ["venv", "3.6"])
def test_attention_configs_compile_for_sm90(which):
    problems = sm90.compile_and_check(sm90.attention_static_jobs() + sm90.attention_coverage_jobs(), which)
    assert not problems, "\n".join(problems)


def test_every_config_is_compiled():
    jobs = sm90.attention_static_jobs() + sm90.attention_coverage_jobs()
    for kernel in ("fwd", "dkdv", "dq"):
        assert not sm90.uncompiled("attention", kernel, A.sm90_configs(kernel), jobs)


def _hook(kernel, dtype, d, mask_kind=0, precision="ieee", variants="all"):
    return A._pruner(kernel)(A.sm90_configs(kernel), dict(q_ptr=torch.empty(0, dtype=dtype)), BLOCK_D=d,
                             BLOCK_DV=d, MASK_KIND=mask_kind, PRECISION=precision, VARIANTS=variants)


def test_autotuner_prune_hook(monkeypatch):
    """The hook the autotuners call: shared-memory pruning per dtype, head dim and mask, the
    config families, and BIGMODEL_AUTOTUNE=0 keeping only the preferred config."""
    for kernel in ("fwd", "dkdv", "dq"):
        for dtype in (torch.float16, torch.float32):
            for d in (64, 128, 256):
                for mask_kind in (0, 1, 2):
                    kept = _hook(kernel, dtype, d, mask_kind, "tf32")
                    mask_elt = (0, 1, dtype.itemsize)[mask_kind]
                    assert kept and all(A.smem_estimate(kernel, c, dtype.itemsize, d, d, mask_elt) <= A.SMEM_LIMIT
                                        for c in kept), (kernel, dtype, d, mask_kind)
        assert not any(c.kwargs["TMA"] for c in _hook(kernel, torch.float16, 64, variants="plain"))
        assert all(c.kwargs["TMA"] for c in _hook(kernel, torch.float16, 64, variants="hopper"))
    assert all(c.kwargs["WS"] for c in _hook("fwd", torch.float16, 128, variants="tma_ws"))
    assert not any(c.kwargs["WS"] for c in _hook("fwd", torch.float16, 128, variants="tma"))
    ieee = _hook("fwd", torch.float32, 64)
    assert ieee and all(max(c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"]) <= 64 for c in ieee)
    monkeypatch.setenv("BIGMODEL_AUTOTUNE", "0")
    for kernel in ("fwd", "dkdv", "dq"):
        kept = _hook(kernel, torch.bfloat16, 128)
        assert len(kept) == 1 and kept[0].kwargs["TMA"], "on sm_90 the preferred config is a Hopper variant"
    assert _hook("fwd", torch.bfloat16, 128)[0].kwargs["WS"]


def test_16bit_configs_are_limited_by_head_dim():
    """Configs measured to spill (or to miss wgmma) in 16-bit at head dim 128 are not offered there."""
    d128 = {A._shape(c) for c in _hook("dkdv", torch.bfloat16, 128)}
    d64 = {A._shape(c) for c in _hook("dkdv", torch.bfloat16, 64)}
    assert (64, 128, 8, 2, True, False) in d64 and (64, 128, 8, 2, True, False) not in d128
    assert (16, 32, 4, 1, False, False) not in d64 | d128  # mma.sync at any head dim
    assert _hook("dkdv", torch.bfloat16, 256), "above 128 every config that fits is offered"
