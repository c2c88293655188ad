"""The C++ engine's tests again at every CPU level below this machine's own.

The engine compiles its kernels per CPU capability and picks GEMM libraries per level
(csrc/cpu/cpu_vec.h, linear_relu.cpp, attention_kernel.h), following the level torch's own
kernels run at (``ATEN_CPU_CAPABILITY``). The rest of the suite runs at the machine's level
(AVX512 here, AVX2 on most desktops); this file reruns the engine's tests in subprocesses capped
to each lower level, capping oneDNN and MKL alike as an older CPU would, so DEFAULT and AVX2 are
tested on every CI machine and AVX512 wherever the machine has it.
"""
import os
import subprocess
import sys

import pytest
import torch



REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# The tests of the C++ engine, as (file, -k selection) per level. One place to keep in step when
# test files are renamed or added. DEFAULT runs a subset (accuracy, NaN, determinism, threads):
# the same kernels as AVX2 with scalar lanes, at a quarter of CI's time.
CPP = "cpp and not triton"
CPP_ENGINE_TESTS = {
    "avx2": [(f, CPP) for f in ("tests/test_linear_relu.py", "tests/test_fused_linear.py", "tests/test_attention.py",
                                "tests/test_linear_relu_fuzz.py", "tests/test_attention_fuzz.py")],
    "default": [(f, CPP + " and (matches or nan or thread or determin or rounded or fuzz)")
                for f in ("tests/test_linear_relu.py", "tests/test_fused_linear.py", "tests/test_attention.py",
                          "tests/test_linear_relu_fuzz.py", "tests/test_attention_fuzz.py")],
}

# What an older CPU would give each library: ATen's kernels, oneDNN's JIT and MKL's code paths.
LEVELS = {
    "default": {"ATEN_CPU_CAPABILITY": "default", "ONEDNN_MAX_CPU_ISA": "SSE41",
                "MKL_ENABLE_INSTRUCTIONS": "SSE4_2"},
    "avx2": {"ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2",
             "MKL_ENABLE_INSTRUCTIONS": "AVX2"},
}
RANK = {"DEFAULT": 0, "AVX2": 1, "AVX512": 2}


def _run(env, args, timeout=900):
    return subprocess.run([sys.executable, *args], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=timeout)


@pytest.mark.parametrize("level", list(LEVELS))
def test_cpp_engine_at_level(level):
    here = torch.backends.cpu.get_cpu_capability()
    if RANK[level.upper()] >= RANK.get(here, 0):
        pytest.skip(f"this process already runs at {here}: the rest of the suite covers {level}")
    env = dict(os.environ, **LEVELS[level])
    # A torch.compile cache per level: a graph compiled under other caps can crash this process.
    env["TORCHINDUCTOR_CACHE_DIR"] = os.path.join(REPO, ".pytest_inductor", level)
    env["PYTHONPATH"] = os.pathsep.join([REPO] + [p for p in [os.environ.get("PYTHONPATH")] if p])
    probe = _run(env, ["-c", "import torch; print(torch.backends.cpu.get_cpu_capability())"])
    assert probe.stdout.strip().splitlines()[-1] == level.upper(), \
        f"ATEN_CPU_CAPABILITY={level} did not take: {probe.stdout} {probe.stderr}"
    selected = {}
    for f, k in CPP_ENGINE_TESTS[level]:
        selected.setdefault(k, []).append(f)
    runs = [files + ["-k", k] for k, files in selected.items()]
    for args in runs:
        proc = _run(env, ["-m", "pytest", "-q", "-p", "no:cacheprovider", *args])
        assert proc.returncode == 0, (
            f"at {level} ({' '.join(f'{k}={v}' for k, v in LEVELS[level].items())}), "
            f"pytest {' '.join(args)} failed:\n{proc.stdout[-6000:]}\n{proc.stderr[-2000:]}")
