"""Compile Triton kernels ahead of time for sm_90 (H200) on a machine without a GPU, and read
what the GPU compiler made of them.

A *job* is a dict naming one kernel and one specialisation of it:
``module``, ``kernel`` (an @triton.jit function or autotuner), ``ptr_types`` (pointer argument
-> element type), ``ones`` (int arguments equal to 1, as Triton specialises unit strides),
``int64`` (int arguments passed as 64-bit), ``constexprs``, ``num_warps``, ``num_stages``, a
``label`` and ``needs`` (the Hopper features it uses: a Triton lacking one skips the job, as the
autotuner skips the config). :func:`run` compiles jobs in worker processes (never under
TRITON_INTERPRET, whose jit objects cannot be compiled), optionally with another Triton first on
the path (the H200's 3.6 from a side folder), and returns per job ``error``, ``skipped`` or
``facts``:

  regs, spill_stores, spill_loads, stack   from ``ptxas -v --gpu-name sm_90a`` (Triton's own
                                           ptxas, so the figures are the ones the GPU will run)
  shared                                   bytes of shared memory the launch needs
  threads                                  threads per CTA (warp-specialised kernels add warps)
  wgmma, mma_sync                          PTX wgmma.mma_async / mma.sync instructions
  hgmma, hmma                              SASS HGMMA / HMMA instructions (cuobjdump)
  tma, utma                                PTX cp.async.bulk.tensor / SASS UTMALDG+UTMASTG (TMA)
  ctas_per_sm                              the occupancy the registers, threads and shared
                                           memory allow on an sm_90 SM

Facts are cached next to Triton's own cache, keyed by the compiled kernel's hash (which covers
the kernel source, its callees, the constexprs, the options and the Triton version): a re-run
costs a cache lookup, and any kernel change compiles again.

``python -m bench.aot JOBS.json OUT.jsonl`` is the worker's entry point (one JSON result a line).
"""
import contextlib
import io
import json
import os
import re
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMEM_LIMIT = 227 * 1024  # bytes of shared memory one CTA may use on sm_90
SM90 = dict(regs=65536, smem=228 * 1024, smem_reserved=1024, threads=2048, ctas=32)


def arg_types(fn, ptr_types, int64=(), ones=()):
    """Signature, constexprs and attrs the way Triton's launcher specialises a typical call:
    pointers 16-byte aligned, the ints in ``ones`` equal to 1 (unit strides: Triton turns them
    into constants), other ints divisible by 16, float scalars as fp32."""
    signature, constexprs, attrs = {}, {}, {}
    for i, name in enumerate(fn.arg_names):
        if fn.params[i].is_constexpr:
            signature[name] = "constexpr"
        elif name in ptr_types:
            signature[name] = "*" + ptr_types[name]
            attrs[(i,)] = [["tt.divisibility", 16]]
        elif name in ones:
            signature[name] = "constexpr"
            constexprs[name] = 1
        elif name in ("qk_scale", "sm_scale", "dropout_p", "negative_slope"):
            signature[name] = "fp32"
        else:
            signature[name] = "i64" if name in int64 else "i32"
            attrs[(i,)] = [["tt.divisibility", 16]]
    return signature, constexprs, attrs


def ctas_per_sm(regs, threads, shared):
    """CTAs one sm_90 SM can hold: registers are allocated per warp in units of 256, shared
    memory per CTA plus 1 KB the hardware reserves."""
    warps = max(1, threads // 32)
    per_warp = -(-max(regs, 1) * 32 // 256) * 256
    by_regs = SM90["regs"] // (per_warp * warps)
    by_threads = SM90["threads"] // (warps * 32)
    by_smem = SM90["smem"] // (shared + SM90["smem_reserved"])
    return max(0, min(by_regs, by_threads, by_smem, SM90["ctas"]))


_PTXAS_USED = re.compile(r"Used (\d+) registers")
_PTXAS_SPILL = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")


def parse_ptxas(log):
    """Registers and spill bytes of the (single) kernel in a ``ptxas -v`` log."""
    used = _PTXAS_USED.findall(log)
    spill = _PTXAS_SPILL.findall(log)
    if not used or not spill:
        raise RuntimeError(f"unexpected ptxas -v output:\n{log[-2000:]}")
    stack, stores, loads = (int(x) for x in spill[-1])
    return dict(regs=int(used[-1]), stack=stack, spill_stores=stores, spill_loads=loads)


def _tool(name):
    from triton.backends.nvidia import __file__ as nvidia

    return os.path.join(os.path.dirname(nvidia), "bin", name)


def _ptxas_log(ptx, arch):
    with tempfile.TemporaryDirectory() as tmp:
        src = os.path.join(tmp, "k.ptx")
        with open(src, "w") as f:
            f.write(ptx)
        done = subprocess.run([_tool("ptxas"), "-v", f"--gpu-name={arch}", src, "-o", os.path.join(tmp, "k.o")],
                              capture_output=True, text=True, check=True)
        return done.stderr + done.stdout


def _sass_counts(cubin):
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "k.cubin")
        with open(path, "wb") as f:
            f.write(cubin)
        sass = subprocess.run([_tool("cuobjdump"), "-sass", path], capture_output=True, text=True, check=True).stdout
    return dict(hgmma=len(re.findall(r"\bHGMMA\.", sass)), hmma=len(re.findall(r"\bHMMA\.", sass)),
                utma=len(re.findall(r"\bUTMA(?:LDG|STG)\b", sass)))


def _facts(compiled, ptxas_log):
    ptx = compiled.asm["ptx"]
    arch = re.search(r"^\.target\s+(\w+)", ptx, re.M).group(1)
    if not ptxas_log or not _PTXAS_USED.search(ptxas_log):
        ptxas_log = _ptxas_log(ptx, arch)  # a Triton cache hit ran no ptxas: run it ourselves
    facts = parse_ptxas(ptxas_log)
    threads = re.search(r"\.(?:reqntid|maxntid)\s+(\d+)", ptx)
    facts.update(
        arch=arch, shared=int(compiled.metadata.shared),
        threads=int(threads.group(1)) if threads else 32 * int(compiled.metadata.num_warps),
        wgmma=ptx.count("wgmma.mma_async"), mma_sync=ptx.count("mma.sync"),
        tma=ptx.count("cp.async.bulk.tensor"), **_sass_counts(compiled.asm["cubin"]))
    facts["ctas_per_sm"] = ctas_per_sm(facts["regs"], facts["threads"], facts["shared"])
    return facts


def _facts_cache_dir():
    from triton import knobs

    return os.path.join(knobs.cache.dir, "bigmodel_sm90_facts")


def _compile(job, target):
    import importlib

    import triton
    from triton import knobs

    kernel = getattr(importlib.import_module(job["module"]), job["kernel"])
    fn = kernel
    while not isinstance(fn, triton.runtime.JITFunction):  # autotuner (and heuristics) wrappers
        fn = fn.fn
    signature, constexprs, attrs = arg_types(fn, job["ptr_types"], job.get("int64", ()), job.get("ones", ()))
    constexprs.update(job["constexprs"])
    src = triton.compiler.ASTSource(fn=fn, signature=signature, constexprs=constexprs, attrs=attrs)
    log = io.StringIO()
    knobs.nvidia.dump_ptxas_log = True  # Triton prints ptxas -v's log when it runs ptxas
    with contextlib.redirect_stdout(log):
        compiled = triton.compile(src, target=target,
                                  options=dict(num_warps=job["num_warps"], num_stages=job["num_stages"]))
    cache = os.path.join(_facts_cache_dir(), compiled.metadata.hash + ".json")
    if os.path.exists(cache):
        with open(cache) as f:
            return json.load(f)
    facts = _facts(compiled, log.getvalue())
    os.makedirs(os.path.dirname(cache), exist_ok=True)
    with open(cache + ".tmp", "w") as f:
        json.dump(facts, f)
    os.replace(cache + ".tmp", cache)
    return facts


def _worker(jobs_path, out_path):
    # One JSON line per job, flushed as it finishes: when the compiler aborts the process (an
    # MLIR assertion, say), the parent knows which job did it and restarts after it.
    os.environ["TRITON_INTERPRET"] = "0"
    sys.path.insert(0, REPO)
    import triton
    from triton.backends.compiler import GPUTarget

    from bigmodel.kernels._hopper import missing_features

    target = GPUTarget("cuda", 90, 32)
    with open(jobs_path) as f:
        jobs = json.load(f)
    with open(out_path, "a") as out:
        for job in jobs:
            start = time.time()
            missing = missing_features(**{k.lower(): v for k, v in job.get("needs", {}).items()})
            if missing:  # as the autotuner does on this Triton: the config is left out, not broken
                result = dict(job=job, skipped=f"needs {', '.join(missing)}", triton=triton.__version__)
            else:
                try:
                    result = dict(job=job, facts=_compile(job, target), seconds=time.time() - start,
                                  triton=triton.__version__)
                except Exception as err:  # report every failure, not just the first
                    result = dict(job=job, error=f"{type(err).__name__}: {err}"[:3000], triton=triton.__version__)
            out.write(json.dumps(result) + "\n")
            out.flush()


def run(jobs, triton_path=None, workers=None, timeout=1800):
    """Compile ``jobs`` for sm_90 in worker processes (one per core; the slowest jobs first,
    dealt so each worker gets a similar share) and return one result dict per job, in order.
    ``triton_path``: a folder holding another Triton, put first on the workers' PYTHONPATH. A
    job that crashes its worker gets an error result; the worker restarts after it."""
    env = dict(os.environ, TRITON_INTERPRET="0")
    env["PYTHONPATH"] = os.pathsep.join(p for p in (triton_path, REPO, os.environ.get("PYTHONPATH")) if p)
    workers = max(1, min(workers or os.cpu_count() or 1, len(jobs)))
    order = sorted(range(len(jobs)), key=lambda i: -_cost_guess(jobs[i]))
    done = {}
    deadline = time.time() + timeout
    with tempfile.TemporaryDirectory() as tmp:
        queues = [order[w::workers] for w in range(workers)]
        while any(queues):
            procs = []
            for w, queue in enumerate(queues):
                if not queue:
                    continue
                jobs_path, out_path = os.path.join(tmp, f"jobs{w}.json"), os.path.join(tmp, f"out{w}.jsonl")
                with open(jobs_path, "w") as f:
                    json.dump([dict(jobs[i], _index=i) for i in queue], f)
                open(out_path, "w").close()
                procs.append((w, out_path, subprocess.Popen(
                    [sys.executable, "-m", "bench.aot", jobs_path, out_path], stdout=subprocess.DEVNULL,
                    stderr=subprocess.PIPE, text=True, env=env, cwd=REPO)))
            for w, out_path, proc in procs:
                _, err = proc.communicate(timeout=max(1.0, deadline - time.time()))
                with open(out_path) as f:
                    finished = [json.loads(line) for line in f if line.strip()]
                for r in finished:
                    done[r["job"].pop("_index")] = r
                queue = queues[w][len(finished):]
                if proc.returncode != 0:
                    if not queue:
                        raise RuntimeError(f"AOT compile worker failed after its last job:\n{err[-4000:]}")
                    crashed = queue.pop(0)  # the job it was compiling
                    version = next((r["triton"] for r in finished), triton_path or "venv")
                    done[crashed] = dict(job=jobs[crashed], triton=version,
                                         error=f"the compiler crashed (exit {proc.returncode}): {err[-1500:]}")
                queues[w] = queue
    return [done[i] for i in range(len(jobs))]


def _cost_guess(job):
    c = job["constexprs"]
    tile = 1
    for name in ("BLOCK_M", "BLOCK_N", "BLOCK_K", "BLOCK_D"):
        tile *= c.get(name, 1)
    return tile * job["num_warps"]


def describe(job):
    return f"{job['kernel']} {job['label']} warps={job['num_warps']} stages={job['num_stages']}"


def compile_failures(results):
    """Lines naming every job that failed to compile or needs more shared memory than sm_90 has."""
    out = []
    for r in results:
        where = f"[triton {r.get('triton', '?')}] {describe(r['job'])}"
        if "error" in r:
            out.append(f"{where}: {r['error']}")
        elif "facts" in r and r["facts"]["shared"] > SMEM_LIMIT:
            out.append(f"{where}: needs {r['facts']['shared']} bytes of shared memory > {SMEM_LIMIT}")
    return out


if __name__ == "__main__":
    _worker(sys.argv[1], sys.argv[2])
