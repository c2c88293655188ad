"""Shared test set-up: Triton runs through its interpreter where there is no GPU, and CUDA-marked
tests skip there (bench/device_check.sh runs them on the H200)."""
import os

# Must happen before anything imports triton.
if "TRITON_INTERPRET" not in os.environ:
    import torch

    if not torch.cuda.is_available():
        os.environ["TRITON_INTERPRET"] = "1"

import pytest  # noqa: E402
import torch  # noqa: E402


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (run on the H200 by bench/device_check.sh)")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _fresh_seed(request):
    # Fresh random inputs every run, but a failure prints the seed to reproduce it.
    seed = int(os.environ.get("BIGMODEL_TEST_SEED") or int.from_bytes(os.urandom(4), "little"))
    torch.manual_seed(seed)
    request.node.user_properties.append(("seed", seed))
    yield


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item, call):
    # A failure names the seed it ran with: rerun with BIGMODEL_TEST_SEED=<seed> to reproduce.
    report = yield
    if report.failed:
        seed = dict(item.user_properties).get("seed")
        if seed is not None:
            report.sections.append(("bigmodel seed", f"BIGMODEL_TEST_SEED={seed}"))
    return report
