"""Shared by the Hopper-variant test files: the fixtures that run an op's Triton kernels on CPU
tensors (bigmodel.ops.triton_kernels_on_cpu, the interpreter), and a forced config family."""
import importlib

import pytest

from bigmodel.ops import triton_kernels_on_cpu


def use_variant(monkeypatch, variant):
    """Only ``variant``'s configs (kernels/_hopper.py), the preferred one, without autotuning."""
    monkeypatch.setenv("BIGMODEL_TRITON_VARIANT", variant)
    monkeypatch.setenv("BIGMODEL_AUTOTUNE", "0")


def fixtures(op):
    """The ``kernels`` (bigmodel.kernels.<op>) and ``triton_on_cpu`` (every bigmodel op runs its
    Triton kernels on CPU tensors) fixtures of a test file."""

    @pytest.fixture
    def kernels():
        return importlib.import_module(f"bigmodel.kernels.{op}")

    @pytest.fixture
    def triton_on_cpu(kernels):
        if not kernels.INTERPRETED:
            pytest.skip("CPU tensors need TRITON_INTERPRET=1 (on a GPU the cuda-marked tests run the variants)")
        with triton_kernels_on_cpu():
            yield

    return kernels, triton_on_cpu
