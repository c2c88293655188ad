"""Is the CPU-level emulation faithful? What each library runs under each level's caps.

    python -m bench.level_check          # a Markdown table, one row per level this CPU can run

For each level a fresh process gets bench.cpu_level's caps (and ONEDNN_VERBOSE=1), runs one
fp32 oneDNN linear, and reports the capability ATen dispatches to, the ISA oneDNN detects and
the kernel it picked, and MKL's view of the CPU: ``mkl_serv_intel_cpu`` (MKL dispatches by
instruction set only on Intel parts) and ``mkl_serv_cbwr_get_auto_branch`` (the code branch it
would pin: 2 = COMPATIBLE, 7 = AVX, 8 = AVX2, 10 = AVX512, 12 = AVX512_E1). MKL_VERBOSE names
no instruction set on a non-Intel CPU, so these two calls are what can be read there.
"""
import re
import subprocess
import sys

from bench import cpu_level

_PROBE = r"""
import ctypes, os, torch
x, w = torch.randn(64, 128), torch.randn(32, 128)
torch.ops.mkldnn._linear_pointwise(x, w, None, "none", [], "")
torch.randn(64, 64) @ torch.randn(64, 64)  # MKL's sgemm, so MKL has initialised
mkl = ctypes.CDLL(os.path.join(os.path.dirname(torch.__file__), "lib", "libtorch_cpu.so"))
try:
    branch, intel = mkl.mkl_serv_cbwr_get_auto_branch(), mkl.mkl_serv_intel_cpu()
except AttributeError:
    branch = intel = "?"
print(f"LEVEL {torch.backends.cpu.get_cpu_capability()} MKL {branch} {intel}", flush=True)
"""


def probe(level):
    """(torch capability, oneDNN ISA, oneDNN kernel, MKL branch, MKL intel_cpu) under ``level``."""
    env = dict(cpu_level.env_for(level), ONEDNN_VERBOSE="1")
    out = subprocess.run([sys.executable, "-c", _PROBE], env=env, capture_output=True, text=True,
                         timeout=300).stdout
    isa = re.search(r"cpu,isa:([^\n]*)", out)
    kernel = re.search(r"primitive,exec,cpu,inner_product,([^,]*)", out)
    last = re.search(r"LEVEL (\S+) MKL (\S+) (\S+)", out)
    return (last.group(1) if last else "?", isa.group(1) if isa else "?", kernel.group(1) if kernel else "?",
            last.group(2) if last else "?", last.group(3) if last else "?")


def main():
    top = cpu_level.native_level()
    rows = ["| level | caps | torch runs | oneDNN ISA | oneDNN kernel | MKL branch | MKL intel_cpu |",
            "|---|---|---|---|---|---|---|"]
    for level in cpu_level.ORDER[: cpu_level.ORDER.index(top) + 1]:
        caps = " ".join(f"{k}={v}" for k, v in cpu_level.LEVELS[level].items() if v is not None)
        rows.append(f"| {level} | {caps} | " + " | ".join(probe(level)) + " |")
    print("\n".join(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
