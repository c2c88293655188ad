"""Triton kernels and their launch configs (installed as bigmodel.kernels). Nothing here knows
about autograd or modules. attention.py, linear_relu.py and _hopper.py import triton, so import
them only where used; _common.py imports neither triton nor anything heavy."""

if __name__ == "kernels":
    # Imported as a top-level `kernels`: from the repository root this directory shadows Hugging
    # Face's `kernels` package, which transformers (5.x) imports when it is installed. Hand the
    # name over to that package, found on the rest of sys.path; without it, `kernels` does not
    # exist, as it would not outside this checkout.
    import importlib.machinery
    import importlib.util
    import os
    import sys

    _root = os.path.dirname(os.path.dirname(os.path.realpath(__file__)))
    _elsewhere = [p for p in sys.path if os.path.realpath(p or os.getcwd()) != _root]
    _spec = importlib.machinery.PathFinder.find_spec("kernels", _elsewhere)
    if _spec is None:  # the import system drops the half-made sys.modules entry itself
        raise ModuleNotFoundError("No module named 'kernels' (this checkout's kernels/ is bigmodel.kernels)",
                                  name="kernels")
    _module = importlib.util.module_from_spec(_spec)
    sys.modules["kernels"] = _module
    _spec.loader.exec_module(_module)
