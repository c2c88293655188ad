"""Every attention kernel config compiles ahead of time for sm_90 and fits in 227 KB of shared
memory, for fp16, bf16 and fp32 and head dims 64, 128 and 256 (plus the feature variants:
masks, dropout, padded head dims, tf32). Compiles are sampled to stay within about a minute:
for each (kernel, dtype, head dim) the surviving config that needs the most shared memory, and
every config at least once. fp32 is compiled with tf32 (tensor cores) for every config, and once
without (the FMA path, small tiles, forward only). See tests/test_aot_compile.py for the machinery.
"""
import torch
import triton

from bigmodel.kernels import attention as A
from test_aot_compile import ELT_SIZE, assert_all_fit, run_jobs, sample

MODULE = "bigmodel.kernels.attention"
HEAD_DIMS = (64, 128, 256)

# kernel -> (Hopper shapes, smem model name, pointers of the input dtype, fp32 pointers, unit strides)
KERNELS = {
    "_attention_fwd_kernel": (
        A.FWD_SHAPES, "fwd", ("q_ptr", "k_ptr", "v_ptr", "out_ptr"), ("lse_ptr",),
        ("stride_qd", "stride_kd", "stride_vd", "stride_od", "stride_mn")),
    "_attention_bwd_dkdv_kernel": (
        A.BWD_DKDV_SHAPES, "dkdv", ("q_ptr", "k_ptr", "v_ptr", "do_ptr", "dk_ptr", "dv_ptr"), ("lse_ptr", "delta_ptr"),
        ("stride_qd", "stride_kd", "stride_vd", "stride_gd", "stride_dkd", "stride_dvd", "stride_mn")),
    "_attention_bwd_dq_kernel": (
        A.BWD_DQ_SHAPES, "dq", ("q_ptr", "k_ptr", "v_ptr", "do_ptr", "dq_ptr"), ("lse_ptr", "delta_ptr"),
        ("stride_qd", "stride_kd", "stride_vd", "stride_gd", "stride_dqd", "stride_mn")),
}


def _configs(shapes):
    return [triton.Config(dict(BLOCK_M=bm, BLOCK_N=bn), num_warps=w, num_stages=s) for bm, bn, w, s in shapes]


def _job(kernel, config, dtype, e, ev, mask_kind=0, causal=True, dropout=False, precision="ieee"):
    _, _, ptrs16, ptrs32, ones = KERNELS[kernel]
    bd, bdv = A._block_dim(e), A._block_dim(ev)
    ptr_types = {p: dtype for p in ptrs16}
    ptr_types.update({p: "fp32" for p in ptrs32})
    ptr_types["mask_ptr"] = "i1" if mask_kind == 1 else dtype
    constexprs = dict(config.kwargs, BLOCK_D=bd, BLOCK_DV=bdv, EVEN_D=bd == e, EVEN_DV=bdv == ev,
                      MASK_KIND=mask_kind, IS_CAUSAL=causal, DROPOUT=dropout, PRECISION=precision)
    label = (f"{dtype} E={e} Ev={ev} {config.kwargs} mask={mask_kind} causal={causal} dropout={dropout} "
             f"{precision}")
    return dict(module=MODULE, kernel=kernel, ptr_types=ptr_types, ones=list(ones),
                int64=["seed", "rng_offset"] if dropout else [], constexprs=constexprs,
                num_warps=config.num_warps, num_stages=config.num_stages, label=label)


def _kept(kernel, dtype, e, ev, mask_kind=0, precision="ieee", **_):
    shapes, model, *_ = KERNELS[kernel]
    mask_elt = (0, 1, ELT_SIZE[dtype])[mask_kind]
    return A.prune(model, _configs(shapes), ELT_SIZE[dtype], A._block_dim(e), A._block_dim(ev), mask_elt, precision)


def _estimate(kernel, config, dtype, e, ev, mask_kind=0, **_):
    mask_elt = (0, 1, ELT_SIZE[dtype])[mask_kind]
    return A.smem_estimate(KERNELS[kernel][1], config, ELT_SIZE[dtype], A._block_dim(e), A._block_dim(ev), mask_elt)


# Feature variants: (dtype, E, Ev, options), each compiled with its largest surviving config.
FEATURES = (
    ("bf16", 128, 128, dict(mask_kind=1, causal=False, dropout=True)),
    ("fp16", 80, 80, dict(mask_kind=2, causal=False)),
    ("fp16", 40, 24, dict(causal=True)),
    ("fp32", 96, 160, dict(mask_kind=2, precision="tf32")),
)
# fp32 without tf32 lowers its dots to FMAs, which compiles slowly (up to a minute a kernel on
# two busy cores): the forward only, small head dim.
IEEE_FP32 = ("_attention_fwd_kernel", "fp32", 32, 32, dict(dropout=True))


def attention_jobs():
    jobs = []
    for kernel in KERNELS:
        candidates = []
        for i, d in enumerate(HEAD_DIMS):
            # fp16 and bf16 tiles are the same size: alternate them across head dims. fp32 with
            # tf32 takes every config; fp32 ieee (small tiles only) is one of the FEATURES.
            for dtype, precision in ((("fp16", "bf16")[i % 2], "ieee"), ("fp32", "tf32")):
                for c in _kept(kernel, dtype, d, d, precision=precision):
                    candidates.append(((dtype, d), str(c), _estimate(kernel, c, dtype, d, d),
                                       _job(kernel, c, dtype, d, d, precision=precision)))
        jobs += sample(candidates)
        for dtype, e, ev, kw in FEATURES:
            worst = max(_kept(kernel, dtype, e, ev, **kw), key=lambda c: _estimate(kernel, c, dtype, e, ev, **kw))
            jobs.append(_job(kernel, worst, dtype, e, ev, **kw))
    kernel, dtype, e, ev, kw = IEEE_FP32
    jobs.append(_job(kernel, _kept(kernel, dtype, e, ev, **kw)[0], dtype, e, ev, **kw))
    for d in HEAD_DIMS:
        jobs.append(dict(module=MODULE, kernel="_attention_bwd_preprocess_kernel",
                         ptr_types=dict(out_ptr="bf16", do_ptr="bf16", delta_ptr="fp32"),
                         ones=["stride_od", "stride_gd"], constexprs=dict(BLOCK_M=A._PRE_BLOCK_M, BLOCK_DV=d),
                         num_warps=4, num_stages=1, label=f"bf16 Ev={d}"))
    return jobs


def test_attention_configs_compile_for_sm90():
    jobs = attention_jobs()
    covered = {(j["kernel"], j["constexprs"].get("BLOCK_M"), j["constexprs"].get("BLOCK_N"), j["num_warps"],
                j["num_stages"]) for j in jobs}
    for kernel, (shapes, *_) in KERNELS.items():  # every Hopper config is compiled at least once
        for bm, bn, w, s in shapes:
            assert (kernel, bm, bn, w, s) in covered, (kernel, bm, bn, w, s)
    assert_all_fit(run_jobs(jobs))


def test_autotuner_prune_hook():
    """The hook the autotuners call: shared-memory pruning per dtype and head dim, and
    BIGMODEL_AUTOTUNE=0 keeping only the preferred config."""
    import os

    configs = _configs(A.FWD_SHAPES)
    hook = A._pruner("fwd")
    for dtype in (torch.float16, torch.float32):
        q = torch.empty(0, dtype=dtype)
        for d in (64, 128, 256):
            for mask_kind in (0, 1, 2):
                kept = hook(configs, dict(q_ptr=q), BLOCK_D=d, BLOCK_DV=d, MASK_KIND=mask_kind, PRECISION="tf32")
                mask_elt = (0, 1, q.element_size())[mask_kind]
                assert kept and all(A.smem_estimate("fwd", c, q.element_size(), d, d, mask_elt) <= A.SMEM_LIMIT
                                    for c in kept)
    ieee = hook(configs, dict(q_ptr=torch.empty(0)), BLOCK_D=64, BLOCK_DV=64, MASK_KIND=0, PRECISION="ieee")
    assert ieee and all(max(c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"]) <= 64 for c in ieee)
    old = os.environ.get("BIGMODEL_AUTOTUNE")
    os.environ["BIGMODEL_AUTOTUNE"] = "0"
    try:
        kept = hook(configs, dict(q_ptr=torch.empty(0, dtype=torch.float16)), BLOCK_D=64, BLOCK_DV=64, MASK_KIND=0,
                    PRECISION="ieee")
        assert kept == configs[:1]
    finally:
        if old is None:
            del os.environ["BIGMODEL_AUTOTUNE"]
        else:
            os.environ["BIGMODEL_AUTOTUNE"] = old
