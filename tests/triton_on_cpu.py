"""Shared by the Hopper-variant test files: the Triton launchers registered as an op's CPU kernel
(run by the interpreter), and a forced config family. (The lead's shared fixture will replace
this.)"""
import contextlib
import importlib

import pytest
import torch

from bigmodel.ops import _registry


@contextlib.contextmanager
def registered(kernels, impls):
    """``impls``: op name -> launcher; bigmodel's ops run them on CPU tensors inside the block."""
    if not _registry.has_ops():
        pytest.skip("bigmodel._C is not built")
    if not kernels.INTERPRETED:
        pytest.skip("CPU tensors need TRITON_INTERPRET=1 (on a GPU the cuda-marked tests run the variants)")
    lib = torch.library.Library("bigmodel", "IMPL")
    for name, fn in impls.items():
        lib.impl(name, fn, "CPU")
    try:
        yield
    finally:
        lib._destroy()


def use_variant(monkeypatch, variant):
    """Only ``variant``'s configs (kernels/_hopper.py), the preferred one, without autotuning."""
    monkeypatch.setenv("BIGMODEL_TRITON_VARIANT", variant)
    monkeypatch.setenv("BIGMODEL_AUTOTUNE", "0")


def fixtures(op):
    """The ``kernels`` (bigmodel.kernels.<op>) and ``triton_on_cpu`` (bigmodel::<op> and its
    backward on CPU tensors run those launchers) fixtures of a test file."""

    @pytest.fixture
    def kernels():
        return importlib.import_module(f"bigmodel.kernels.{op}")

    @pytest.fixture
    def triton_on_cpu(kernels):
        launchers = {op: getattr(kernels, f"{op}_fwd"), f"{op}_backward": getattr(kernels, f"{op}_bwd")}
        with registered(kernels, launchers):
            yield

    return kernels, triton_on_cpu
