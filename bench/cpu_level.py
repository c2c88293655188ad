"""CPU capability levels: run the benchmark as a smaller CPU would (``--cpu-capability``).

ATen picks its vectorised kernels once, when torch loads (``ATEN_CPU_CAPABILITY``), and the
two libraries under it read their own caps when they first run: oneDNN
(``ONEDNN_MAX_CPU_ISA``) and MKL (``MKL_ENABLE_INSTRUCTIONS``). Capping all three makes an
AVX-512 machine run the code an AVX2 machine runs. The caps must be in the environment before
torch loads, so ``python -m bench --cpu-capability X`` runs its work in a fresh process that
has them (:func:`relaunch`).

Nothing here imports torch at module level: the parent reads /proc/cpuinfo before it decides.
"""
import getpass
import os
import subprocess
import sys
import tempfile

ENV_KEYS = ("ATEN_CPU_CAPABILITY", "ONEDNN_MAX_CPU_ISA", "MKL_ENABLE_INSTRUCTIONS")
RELAUNCHED = "BENCH_CPU_CAPABILITY_RELAUNCHED"  # set in the fresh process: it never relaunches again
ORDER = ("default", "avx2", "avx512")  # ATen's x86 levels, lowest first
# Per level, what the three libraries are capped at. DEFAULT is a CPU without AVX2/FMA; the
# best such parts (Sandy/Ivy Bridge) have AVX, so oneDNN and MKL keep AVX. AVX512 is the top
# level and caps nothing, so native bf16 / AMX stay where the CPU has them.
LEVELS = {
    "default": {"ATEN_CPU_CAPABILITY": "default", "ONEDNN_MAX_CPU_ISA": "AVX", "MKL_ENABLE_INSTRUCTIONS": "AVX"},
    "avx2": {"ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2", "MKL_ENABLE_INSTRUCTIONS": "AVX2"},
    "avx512": {"ATEN_CPU_CAPABILITY": "avx512", "ONEDNN_MAX_CPU_ISA": None, "MKL_ENABLE_INSTRUCTIONS": None},
}  # None: unset (no cap)
# The flags ATen requires for each level (aten/src/ATen/native/DispatchStub.cpp's checks).
REQUIRES = {"default": (), "avx2": ("avx2", "fma"),
            "avx512": ("avx2", "fma", "avx512f", "avx512bw", "avx512vl", "avx512dq")}
BF16_FLAGS = ("avx512_bf16", "amx_bf16")


def cpu_flags(path="/proc/cpuinfo"):
    """The CPU's feature flags (empty where /proc/cpuinfo can't be read)."""
    try:
        with open(path) as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def native_level(flags=None):
    """The highest of ORDER this CPU can run ('avx512' where /proc/cpuinfo is unreadable, so
    the check never refuses what torch itself would accept)."""
    flags = cpu_flags() if flags is None else flags
    if not flags:
        return ORDER[-1]
    return [lv for lv in ORDER if all(f in flags for f in REQUIRES[lv])][-1]


def check_supported(level, flags=None):
    """Raises SystemExit naming the missing flags if this CPU cannot run ``level``."""
    if level not in LEVELS:
        raise SystemExit(f"bench: unknown --cpu-capability {level!r}; expected one of {', '.join(ORDER)}")
    flags = cpu_flags() if flags is None else flags
    missing = [f for f in REQUIRES[level] if flags and f not in flags]
    if missing:
        raise SystemExit(f"bench: this CPU cannot run --cpu-capability {level}: it lacks "
                         f"{', '.join(missing)} (its highest level is {native_level(flags)})")


def needs_relaunch(level, environ=None):
    """True when the caps for ``level`` are not already this process's environment."""
    environ = os.environ if environ is None else environ
    return any(environ.get(k) != v for k, v in LEVELS[level].items())


def env_for(level, environ=None):
    """This process's environment with ``level``'s caps in place of any it had."""
    environ = os.environ if environ is None else environ
    env = {k: v for k, v in environ.items() if k not in ENV_KEYS}
    env.update({k: v for k, v in LEVELS[level].items() if v is not None})
    return env


def relaunch(argv, level, replace):
    """Runs ``python -m bench argv`` with ``level``'s caps in its environment: in place of this
    process (``replace``, the command line) or as a child whose exit status is returned (an
    in-process caller, e.g. a test, whose torch is already loaded)."""
    if os.environ.get(RELAUNCHED):
        raise SystemExit(f"bench: --cpu-capability {level}: the caps did not reach the fresh process "
                         f"(its environment has " + ", ".join(f"{k}={os.environ.get(k)!r}" for k in ENV_KEYS) + ")")
    env = env_for(level)
    env[RELAUNCHED] = level
    cmd = [sys.executable, "-m", "bench", *argv]
    print(f"bench: --cpu-capability {level}: re-running with "
          + " ".join(f"{k}={v or '(unset)'}" for k, v in LEVELS[level].items()), file=sys.stderr, flush=True)
    if replace:
        sys.stderr.flush()
        sys.stdout.flush()
        os.execve(sys.executable, cmd, env)
    return subprocess.run(cmd, env=env).returncode


def torch_level():
    """The capability ATen dispatches to in this process, lower case ('avx2')."""
    import torch

    return torch.backends.cpu.get_cpu_capability().lower()


def verify(level):
    """In the capped process: torch must run ``level`` (ATen falls back silently otherwise)."""
    got = torch_level()
    if got != level:
        raise SystemExit(f"bench: asked for --cpu-capability {level} but torch runs {got.upper()} "
                         f"(ATEN_CPU_CAPABILITY={os.environ.get('ATEN_CPU_CAPABILITY')!r})")


def isolate_compile_cache(level, environ=None):
    """Gives torch.compile a cache of its own per level (unless TORCHINDUCTOR_CACHE_DIR is set).

    Inductor's cache does not key its C++ kernels on the capability ATen runs at: a graph
    compiled under the AVX2 caps, loaded again by an uncapped process, corrupted the heap
    ("double free or corruption") in the attention fwd+bwd case, and one compiled uncapped
    failed to build under the DEFAULT caps. Returns the folder.
    """
    environ = os.environ if environ is None else environ
    if not environ.get("TORCHINDUCTOR_CACHE_DIR"):
        try:
            user = getpass.getuser()
        except (KeyError, OSError):
            user = str(os.getuid())
        environ["TORCHINDUCTOR_CACHE_DIR"] = os.path.join(tempfile.gettempdir(), f"torchinductor_{user}_bench_{level}")
    return environ["TORCHINDUCTOR_CACHE_DIR"]


def native_bf16(flags=None, environ=None):
    """True when bf16 arithmetic is native in this process: the CPU has avx512_bf16 or AMX,
    ATen runs AVX512 and oneDNN is not capped below it."""
    flags = cpu_flags() if flags is None else flags
    environ = os.environ if environ is None else environ
    isa = environ.get("ONEDNN_MAX_CPU_ISA", environ.get("DNNL_MAX_CPU_ISA", "ALL")).upper()
    uncapped = isa == "ALL" or "BF16" in isa or "AMX" in isa
    return any(f in flags for f in BF16_FLAGS) and torch_level() == "avx512" and uncapped


def describe(flags=None, environ=None):
    """The level this process runs, as the CSV's cpu_level column records it: ATen's level
    (+BF16 where bf16 is native) and 'native' or 'capped' (below what the CPU can run);
    'capped (ATen only)' when oneDNN and MKL were not capped with it."""
    flags = cpu_flags() if flags is None else flags
    environ = os.environ if environ is None else environ
    level = torch_level()
    name = level.upper() + ("+BF16" if native_bf16(flags, environ) else "")
    if level not in ORDER or ORDER.index(level) >= ORDER.index(native_level(flags)):
        return f"{name} native"
    partial = level in LEVELS and needs_relaunch(level, environ)
    return f"{name} capped" + (" (ATen only)" if partial else "")
