"""Smoke test of the benchmark suite (python -m bench): the plumbing, not the speed.

Runs the suite in-process at tiny shapes with one repetition and checks the CSV's columns, the
summary and a plot; plus the pieces with logic of their own (quantiles, merge, FLOP counts,
skipping a provider that is not implemented).
"""
import csv
import math
import os

import pytest
import torch

from bench import __main__ as bench_main
from bench import attention, linear_relu, report
from bench.core import Case, Provider, op_provider
from bench.runner import COLUMNS, Budget, Runner
from bench.timing import quantiles

META = {"device": "cpu", "torch": torch.__version__, "triton": "", "git_sha": "x", "timestamp": "t"}


def test_smoke_run_writes_csv_summary_and_plot(tmp_path):
    argv = ["--smoke", "--device", "cpu", "--reps", "1", "--out", str(tmp_path), "--no-progress",
            "--modes", "fwd,fwd+bwd"]
    assert bench_main.main(argv) == 0
    with open(tmp_path / "cpu.csv", newline="") as f:
        reader = csv.DictReader(f)
        rows = list(reader)
    assert reader.fieldnames == COLUMNS
    assert {r["op"] for r in rows} >= {"ceiling_matmul", "ceiling_copy", "linear_relu", "attention", "mlp_step"}
    providers = {r["provider"] for r in rows if r["op"] == "linear_relu"}
    assert {"bigmodel-cpp", "torch-eager"} <= providers
    for r in rows:
        assert float(r["ms_p20"]) <= float(r["ms_p50"]) <= float(r["ms_p80"])
        assert r["device"] == "cpu" and r["timestamp"]
        if r["op"] == "linear_relu":
            assert r["shape"].startswith("M=") and float(r["tflops"]) > 0 and float(r["gbps"]) > 0
    summary = (tmp_path / "cpu_summary.md").read_text()
    assert "bigmodel against PyTorch's best" in summary and "linear_relu" in summary
    assert os.path.getsize(tmp_path / "cpu_linear_relu_fp32.png") > 1000

    # A second run of one case replaces that case's rows and keeps the others.
    argv2 = argv[:-2] + ["--modes", "fwd", "--ops", "linear_relu"]
    assert bench_main.main(argv2) == 0
    with open(tmp_path / "cpu.csv", newline="") as f:
        rows2 = list(csv.DictReader(f))
    key = lambda r: (r["op"], r["mode"], r["provider"], r["dtype"], r["shape"])  # noqa: E731
    assert len({key(r) for r in rows2}) == len(rows2)
    assert any(r["op"] == "mlp_step" for r in rows2)


def test_not_implemented_provider_is_skipped_not_raised():
    def broken(*inputs):
        raise NotImplementedError("coming soon")

    x = torch.randn(8, 8)
    case = Case("linear_relu", "fwd", torch.float32, {"M": 8}, torch.device("cpu"), 1.0, 1.0,
                lambda seed: [x], [op_provider("bigmodel-x", broken, "fwd"),
                                   op_provider("torch-eager", torch.relu, "fwd")])
    runner = Runner(torch.device("cpu"), Budget(0.0, 1, 1), META)
    rows = runner.run(case)
    assert [r["provider"] for r in rows] == ["torch-eager"]
    assert runner.skipped[0][1] == "bigmodel-x" and "not implemented" in runner.skipped[0][2]


def test_wrong_output_is_flagged():
    x = torch.randn(8, 8)
    case = Case("linear_relu", "fwd", torch.float32, {"M": 8}, torch.device("cpu"), 1.0, 1.0,
                lambda seed: [x], [Provider("torch-eager", lambda i, s: (lambda: torch.relu(i[0]))),
                                   Provider("bigmodel-bad", lambda i, s: (lambda: i[0] * 2))])
    runner = Runner(torch.device("cpu"), Budget(0.0, 1, 1), META)
    runner.run(case)
    assert [m[1] for m in runner.mismatches] == ["bigmodel-bad"]


def test_quantiles_and_merge():
    assert quantiles([3.0, 1.0, 2.0]) == (2.0, pytest.approx(1.4), pytest.approx(2.6))
    old = [dict(op="a", mode="fwd", dtype="fp32", shape="M=1", device="cpu", provider=p) for p in "xy"]
    old.append(dict(op="a", mode="fwd", dtype="fp32", shape="M=2", device="cpu", provider="x"))
    new = [dict(op="a", mode="fwd", dtype="fp32", shape="M=1", device="cpu", provider="x")]
    merged = report.merge(old, new)
    # The whole re-measured case is replaced (its 'y' row too): a case's rows share one run.
    assert [(r["shape"], r["provider"]) for r in merged] == [("M=2", "x"), ("M=1", "x")]


def test_flop_counts():
    assert linear_relu.flops(4096, 784, 512, "fwd") == 2 * 4096 * 784 * 512
    assert linear_relu.flops(4096, 784, 512, "fwd+bwd") == 3 * 2 * 4096 * 784 * 512
    fwd = attention.flops(2, 16, 8192, 8192, 128, False, "fwd")
    assert fwd == 4 * 2 * 16 * 8192 * 8192 * 128
    assert attention.flops(2, 16, 8192, 8192, 128, True, "fwd") == fwd / 2
    assert attention.flops(2, 16, 8192, 8192, 128, False, "bwd") == 2.5 * fwd
    assert report.slug("NVIDIA H200") == "nvidia_h200"
    assert report.plot_families("attention", "B=2,H=16,L=8192,S=8192,D=128,causal=0")[1:] == ("L", 8192)
    assert math.isnan(report._f(""))


def test_targets_table_reads_ratios_from_rows():
    from bench import targets

    shape = "M=65536,K=128,N=128"
    rows = [dict(op="linear_relu", mode="fwd", dtype="fp32", shape=shape, provider=p, ms_p50=ms, tflops="1")
            for p, ms in (("bigmodel-cpp", "10"), ("torch-eager", "14"))]
    line = [x for x in targets.table(rows, "cpu") if shape in x][0]
    assert "1.40x" in line and line.endswith("| yes |")


def test_cpu_peak_memory_counts_a_reused_heap_block():
    """peak_mb sees an 8 MB tensor even when glibc serves it from a block freed just before
    (below the mmap threshold, with no RSS change unless the free heap was handed back)."""
    import sys

    if not sys.platform.startswith("linux"):
        pytest.skip("reads /proc")
    from bench.memory import peak_mb

    n = 2 * 2**20  # 8 MB of float32
    for _ in range(3):  # freed mappings raise glibc's dynamic threshold: the next comes from the heap
        torch.ones(n)
    mb = peak_mb(lambda: torch.ones(n), torch.device("cpu"))
    assert 7.5 <= mb <= 12, mb
