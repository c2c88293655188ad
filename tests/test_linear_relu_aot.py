"""Every Triton config compiles ahead of time for sm_90 (H200) and fits its shared memory.

A kernel that only the GPU compiler rejects (or that needs more than 227 KB of shared memory)
fails here, on a machine without a GPU. The compiles run in a subprocess: the tests run with
TRITON_INTERPRET=1, under which triton.jit builds interpreter objects that cannot be compiled.
This file is also that subprocess's entry point (``python tests/test_aot_compile.py JOBS.json``
writes its results as JSON on stdout).
"""
import json
import os
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMEM_LIMIT = 227 * 1024
DTYPES = ("fp16", "bf16", "fp32")
ELT_SIZE = {"fp16": 2, "bf16": 2, "fp32": 4}


def arg_types(fn, ptr_types, int64=(), ones=()):
    """Signature, constexprs and attrs the way Triton's launcher specialises a typical call:
    pointers 16-byte aligned, the ints in ``ones`` equal to 1 (unit strides: Triton turns them
    into constants), other ints divisible by 16, floats as fp32."""
    signature, constexprs, attrs = {}, {}, {}
    for i, name in enumerate(fn.arg_names):
        param = fn.params[i]
        if param.is_constexpr:
            signature[name] = "constexpr"
        elif name in ptr_types:
            signature[name] = "*" + ptr_types[name]
            attrs[(i,)] = [["tt.divisibility", 16]]
        elif name in ones:
            signature[name] = "constexpr"
            constexprs[name] = 1
        elif name in ("qk_scale", "sm_scale", "dropout_p"):
            signature[name] = "fp32"
        else:
            signature[name] = "i64" if name in int64 else "i32"
            attrs[(i,)] = [["tt.divisibility", 16]]
    return signature, constexprs, attrs


def _worker():
    """Subprocess: compile each job for sm_90 and report the shared memory it uses."""
    os.environ["TRITON_INTERPRET"] = "0"
    sys.path.insert(0, ROOT)
    import importlib

    import triton
    from triton.backends.compiler import GPUTarget

    target = GPUTarget("cuda", 90, 32)
    results = []
    with open(sys.argv[1]) as f:
        jobs = json.load(f)
    for job in jobs:
        kernel = getattr(importlib.import_module(job["module"]), job["kernel"])
        fn = kernel.fn if isinstance(kernel, triton.runtime.Autotuner) else kernel  # the jit function
        start = time.time()
        try:
            signature, constexprs, attrs = arg_types(fn, job["ptr_types"], job.get("int64", ()), job.get("ones", ()))
            constexprs.update(job["constexprs"])
            compiled = triton.compile(
                triton.compiler.ASTSource(fn=fn, signature=signature, constexprs=constexprs, attrs=attrs),
                target=target, options=dict(num_warps=job["num_warps"], num_stages=job["num_stages"]))
            results.append(dict(job=job, shared=compiled.metadata.shared, seconds=time.time() - start))
        except Exception as err:  # report every failure, not just the first
            results.append(dict(job=job, error=f"{type(err).__name__}: {err}"[:2000]))
    json.dump(results, sys.stdout)


def run_jobs(jobs, timeout=300, workers=None):
    """Compile ``jobs`` in subprocesses without TRITON_INTERPRET (one per core, jobs dealt
    round-robin); returns the per-job results."""
    env = dict(os.environ, TRITON_INTERPRET="0")
    workers = max(1, min(workers or os.cpu_count() or 1, len(jobs)))
    procs = []
    with tempfile.TemporaryDirectory() as tmp:
        for w in range(workers):
            path = os.path.join(tmp, f"jobs{w}.json")
            with open(path, "w") as f:
                json.dump(jobs[w::workers], f)
            procs.append(subprocess.Popen([sys.executable, os.path.abspath(__file__), path], stdout=subprocess.PIPE,
                                          stderr=subprocess.PIPE, text=True, env=env, cwd=ROOT))
        results = []
        for proc in procs:
            out, err = proc.communicate(timeout=timeout)
            assert proc.returncode == 0, f"AOT compile worker failed:\n{err[-4000:]}"
            results += json.loads(out)
    return results


def assert_all_fit(results):
    failures = []
    for r in results:
        job = r["job"]
        what = f"{job['kernel']} {job['label']} warps={job['num_warps']} stages={job['num_stages']}"
        if "error" in r:
            failures.append(f"{what}: {r['error']}")
        elif r["shared"] > SMEM_LIMIT:
            failures.append(f"{what}: needs {r['shared']} bytes of shared memory > {SMEM_LIMIT}")
    assert not failures, "\n".join(failures)


def sample(candidates):
    """Pick the compiles worth their time from (combo, config_key, estimate, job) candidates:
    for every combo (dtype, head dim, ...) the config needing the most shared memory, and every
    config at least once (spread round-robin over the combos it survives in)."""
    chosen = {}
    by_combo = {}
    for combo, cfg, est, job in candidates:
        if combo not in by_combo or est > by_combo[combo][0]:
            by_combo[combo] = (est, cfg, job)
    for combo, (_, cfg, job) in by_combo.items():
        chosen[(combo, cfg)] = job
    seen = {cfg for (_, cfg) in chosen}
    turn = 0
    for cfg in dict.fromkeys(c[1] for c in candidates):
        if cfg in seen:
            continue
        options = [c for c in candidates if c[1] == cfg]
        combo, _, _, job = options[turn % len(options)]
        turn += 1
        chosen[(combo, cfg)] = job
        seen.add(cfg)
    return list(chosen.values())


# ---------------------------------------------------------------------------------------------
# linear_relu


def _linear_relu_jobs():
    import triton

    from bigmodel.kernels import linear_relu as lr

    kernels = {
        # kernel: (Hopper shapes, extra tiles in the smem model, constexprs, unit strides)
        "_linear_relu_fwd_kernel": (lr._FWD_SHAPES, 0, dict(HAS_BIAS=True, GROUP_M=8),
                                    ("stride_xk", "stride_wk", "stride_yn")),
        "_linear_relu_bwd_dx_kernel": (lr._BWD_SHAPES, 1, dict(GROUP_M=8),
                                       ("stride_gn", "stride_yn", "stride_wk", "stride_dxk")),
        "_linear_relu_bwd_dw_kernel": (lr._BWD_SHAPES, 1, dict(COMPUTE_DW=True, COMPUTE_DB=True),
                                       ("stride_gn", "stride_yn", "stride_xk", "stride_dwk")),
    }
    jobs = []
    for name, (shapes, extra, consts, ones) in kernels.items():
        candidates = []
        for dtype in DTYPES:
            configs = [triton.Config(dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk), num_warps=w, num_stages=s)
                       for bm, bn, bk, w, s in shapes]
            kept = [c for c in configs if lr.smem_estimate(c, ELT_SIZE[dtype], extra) <= lr.SMEM_LIMIT] or configs[-1:]
            for c in kept:
                ptrs = {p: dtype for p in ("x_ptr", "w_ptr", "b_ptr", "y_ptr", "g_ptr", "dx_ptr", "dw_ptr", "db_ptr")}
                job = dict(
                    module="bigmodel.kernels.linear_relu", kernel=name, ptr_types=ptrs, ones=list(ones),
                    constexprs=dict(c.kwargs, PRECISION="ieee", **consts), num_warps=c.num_warps,
                    num_stages=c.num_stages, label=f"{dtype} {c.kwargs}")
                candidates.append((dtype, str(c), lr.smem_estimate(c, ELT_SIZE[dtype], extra), job))
        jobs += sample(candidates)
    return jobs


def test_linear_relu_configs_compile_for_sm90():
    results = run_jobs(_linear_relu_jobs())
    assert_all_fit(results)


if __name__ == "__main__":
    _worker()
