"""Every linear_relu Triton config compiles ahead of time for sm_90 with the venv's Triton and
with the H200's (3.6), and the ones the autotuners may pick for fp16/bf16 pass the static rules:
no spills, every 16-bit dot on wgmma, shared memory within 227 KB, TMA where the variant says
so, warp specialisation where it says so (bench/sm90.py; the machinery is bench/aot.py)."""
import pytest
import triton

from bench import sm90
from bigmodel.kernels import linear_relu as LR


@pytest.mark.parametrize("which", ["venv", "3.6"])
def test_linear_relu_configs_compile_for_sm90(which):
    problems = sm90.compile_and_check(sm90.linear_relu_static_jobs() + sm90.linear_relu_coverage_jobs(), which)
    assert not problems, "\n".join(problems)


def test_every_config_is_compiled():
    jobs = sm90.linear_relu_static_jobs() + sm90.linear_relu_coverage_jobs()
    for kernel in ("fwd", "dx", "dw"):
        assert not sm90.uncompiled("linear_relu", kernel, LR.sm90_configs(kernel), jobs)


def test_prune_by_family_and_shared_memory():
    configs = LR.sm90_configs("fwd")
    hopper = LR.prune(configs, 2, family="hopper")
    assert hopper and all(c.kwargs["TMA"] for c in hopper)
    assert not any(c.kwargs["TMA"] for c in LR.prune(configs, 2, family="plain"))
    assert all(c.kwargs["TMA"] and c.kwargs["WS"] for c in LR.prune(configs, 2, family="tma_ws"))
    everything = LR.prune(configs, 4, family="all")
    assert everything and all(LR.smem_estimate(c, 4) <= LR.SMEM_LIMIT for c in everything)
    assert LR.prune(configs, 2, family="all")[0].kwargs["TMA"], "on sm_90 the preferred config is the TMA one"
    # a config needing more shared memory than sm_90 has is never offered
    big = triton.Config(dict(BLOCK_M=256, BLOCK_N=256, BLOCK_K=128, TMA=False, WS=False, GROUP_M=8),
                        num_warps=8, num_stages=4)
    assert big not in LR.prune([big] + configs, 2, family="all")
