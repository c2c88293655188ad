"""Build bigmodel and its C++/CUDA extension ``bigmodel._C``.

The CPU engine (csrc/bigmodel.cpp, csrc/cpu/*.cpp) is always built. CUDA sources
(csrc/cuda/*.cu) are built whenever nvcc and a CUDA build of torch are present, GPU or not.

Environment:
  BIGMODEL_CUDA=auto|0|1   build the CUDA sources: when possible (default), never, always.
  TORCH_CUDA_ARCH_LIST      respected; defaults to "9.0" (Hopper) when unset.
  CUDA_HOME                 the toolkit folder (bin/nvcc, lib64/libcudart.so). When unset we
                            look for it, resolving wrapper scripts named nvcc on PATH.
"""
import glob
import os
import re
import shutil
import site
import sys

from setuptools import setup

HERE = os.path.dirname(os.path.abspath(__file__))


def _is_toolkit(folder):
    return bool(folder) and os.path.isfile(os.path.join(folder, "bin", "nvcc")) and bool(
        glob.glob(os.path.join(folder, "lib*", "libcudart.so*"))
    )


def _find_cuda_home():
    """The real CUDA toolkit folder, or None.

    torch guesses CUDA_HOME from the `nvcc` on PATH; where that is a wrapper script the guess
    is wrong and the link fails, so follow the wrapper to the nvcc it runs.
    """
    for var in ("CUDA_HOME", "CUDA_PATH"):
        if _is_toolkit(os.environ.get(var)):
            return os.environ[var]
    candidates = []
    nvcc = shutil.which("nvcc")
    if nvcc:
        real = os.path.realpath(nvcc)
        candidates.append(os.path.dirname(os.path.dirname(real)))
        try:
            with open(real, "rb") as f:
                head = f.read(4096)
            if head.startswith(b"#!"):
                for path in re.findall(rb"(/[^\s\"']+)/bin/nvcc", head):
                    candidates.append(path.decode())
        except OSError:
            pass
    candidates += ["/usr/local/cuda"] + sorted(glob.glob("/usr/local/cuda-*"), reverse=True)
    return next((c for c in candidates if _is_toolkit(c)), None)


def _want_cuda():
    mode = os.environ.get("BIGMODEL_CUDA", "auto").lower()
    if mode in ("0", "off", "false", "no"):
        return False, None
    import torch

    home = _find_cuda_home()
    ok = torch.version.cuda is not None and home is not None
    if mode in ("1", "on", "true", "yes") and not ok:
        sys.exit(
            "BIGMODEL_CUDA=1 but no CUDA build is possible: "
            f"torch.version.cuda={torch.version.cuda}, CUDA toolkit={home}"
        )
    return ok, home


def _extra_cuda_includes():
    """Headers torch's CUDA headers need (cuBLAS, cuSPARSE ...) shipped in pip's nvidia wheels."""
    # sys.path covers pip's isolated build environments, site dirs the usual installs.
    roots = [p for p in sys.path if p] + site.getsitepackages() + [site.getusersitepackages()]
    found = []
    for root in roots:
        for sub in ("nvidia/cu13/include", "nvidia/cu12/include"):
            path = os.path.join(root, sub)
            if os.path.isdir(path):
                found.append(path)
        found += sorted(glob.glob(os.path.join(root, "nvidia", "*", "include")))
    return list(dict.fromkeys(found))


def _cublaslt_link_args(cuda_home):
    """-L and -l for cuBLASLt: in the toolkit, or (pip CUDA wheels) only as a versioned .so."""
    dirs = [os.path.join(cuda_home, "lib64")]
    for root in [p for p in sys.path if p] + site.getsitepackages():
        dirs += sorted(glob.glob(os.path.join(root, "nvidia", "*", "lib"))) + [os.path.join(root, "nvidia", "cublas", "lib")]
    for d in dirs:
        libs = sorted(glob.glob(os.path.join(d, "libcublasLt.so*")))
        if libs:
            return ["-L" + d, "-l:" + os.path.basename(libs[0]), "-Wl,-rpath," + d]
    return ["-lcublasLt"]


def _extensions():
    with_cuda, cuda_home = _want_cuda()
    if with_cuda:
        # Must be set before torch.utils.cpp_extension is imported: it reads CUDA_HOME once.
        os.environ["CUDA_HOME"] = cuda_home
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "9.0")
    from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension

    sources = [os.path.relpath(p, HERE) for p in sorted(glob.glob(os.path.join(HERE, "csrc", "*.cpp")))]
    for sub in ("autograd", "cpu"):
        sources += [os.path.relpath(p, HERE) for p in sorted(glob.glob(os.path.join(HERE, "csrc", sub, "*.cpp")))]
    cxx_flags = ["-O3", "-fopenmp", "-DBIGMODEL_WITH_CUDA=%d" % int(with_cuda)]
    if sys.platform == "linux":
        cxx_flags.append("-fvisibility=hidden")
    kwargs = dict(
        name="bigmodel._C",
        sources=sources,
        include_dirs=[os.path.join(HERE, "csrc")],
        extra_compile_args={"cxx": cxx_flags},
        extra_link_args=["-fopenmp"],
    )
    if with_cuda:
        cu = sorted(glob.glob(os.path.join(HERE, "csrc", "cuda", "*.cu")))
        cu += sorted(glob.glob(os.path.join(HERE, "csrc", "cuda", "*.cpp")))
        kwargs["sources"] += [os.path.relpath(p, HERE) for p in cu]
        kwargs["include_dirs"] += _extra_cuda_includes()
        kwargs["extra_compile_args"]["nvcc"] = ["-O3", "-DBIGMODEL_WITH_CUDA=1"]
        kwargs["extra_link_args"] += _cublaslt_link_args(cuda_home)
        ext = CUDAExtension(**kwargs)
    else:
        ext = CppExtension(**kwargs)
    return [ext], {"build_ext": BuildExtension.with_options(use_ninja=True)}


def _packages():
    subs = sorted(
        d for d in os.listdir(os.path.join(HERE, "bigmodel"))
        if d != "kernels" and os.path.isfile(os.path.join(HERE, "bigmodel", d, "__init__.py"))
    )
    return ["bigmodel"] + ["bigmodel." + d for d in subs] + ["bigmodel.kernels"]


ext_modules, cmdclass = _extensions()

setup(
    name="bigmodel",
    version="0.1.0",
    description="Fused Triton and C++ kernels for attention and linear+ReLU, forward and backward",
    packages=_packages(),
    # kernels/ is Triton only and ships as bigmodel.kernels (never a top-level `kernels`).
    package_dir={"bigmodel.kernels": "kernels"},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
    python_requires=">=3.10",
    install_requires=["torch>=2.5", "numpy"],
    extras_require={"triton": ["triton>=3.2"]},
)
