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


def test_transcendental_epilogues_get_the_tiles_that_do_not_spill():
    """GELU, SiLU, Tanh and Sigmoid keep only tiles with at most 96 live fp32 values a thread
    (the spill boundary measured on sm_90, kernels/linear_relu.py); ReLU keeps the larger ones."""
    for kernel, extra in (("fwd", 0), ("dx", 1), ("dw", 1)):
        configs = LR.sm90_configs(kernel)
        relu = LR.prune(configs, 2, extra, family="all")
        for act in ("gelu", "silu", "tanh", "sigmoid"):
            kept = LR.prune(configs, 2, extra, family="all", act=act)
            assert kept and all(LR.live_values_per_thread(c, extra) <= 96 for c in kept), (kernel, act)
            assert set(map(str, kept)) < set(map(str, relu)), (kernel, act)
        assert LR.prune(configs, 2, extra, family="all", act="leaky_relu") == relu
