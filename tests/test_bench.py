"""Smoke test of the benchmark suite (python -m bench): the plumbing, not the speed.

Runs the suite in-process at tiny shapes with one repetition and checks the CSV's columns, the
summary and a plot; plus the pieces with logic of their own (quantiles, merge, FLOP counts,
skipping a provider that is not implemented or over its time budget, the CPU-level caps in a
child process, progress lines while a case runs, the bf16 policy, the README table).
"""
import csv
import io
import math
import os
import re
import time
import types

import pytest
import torch

from bench import __main__ as bench_main
from bench import attention, ceilings, cpu_level, linear_relu, readme, report, targets
from bench.core import Case, Provider, op_provider
from bench.progress import Estimator, Progress
from bench.runner import COLUMNS, Budget, Runner
from bench.timing import quantiles

META = {"device": "cpu", "cpu_level": "AVX2 capped", "torch": torch.__version__, "triton": "",
        "git_sha": "x", "timestamp": "t"}
STEM = f"cpu_{cpu_level.torch_level()}"  # this process's level names the files


def _read(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_smoke_run_writes_csv_summary_and_plot(tmp_path):
    argv = ["--smoke", "--device", "cpu", "--reps", "1", "--out", str(tmp_path), "--no-progress",
            "--modes", "fwd,fwd+bwd"]
    assert bench_main.main(argv) == 0
    with open(tmp_path / f"{STEM}.csv", newline="") as f:
        reader = csv.DictReader(f)
        rows = list(reader)
    assert reader.fieldnames == COLUMNS
    assert {r["op"] for r in rows} >= {"ceiling_matmul", "ceiling_copy", "linear_relu", "attention", "mlp_step"}
    providers = {r["provider"] for r in rows if r["op"] == "linear_relu"}
    assert {"bigmodel-cpp", "torch-eager"} <= providers
    for r in rows:
        assert float(r["ms_p20"]) <= float(r["ms_p50"]) <= float(r["ms_p80"])
        assert r["device"] == "cpu" and r["timestamp"] and r["cpu_level"].startswith(cpu_level.torch_level().upper())
        if r["op"] == "linear_relu":
            assert r["shape"].startswith("M=") and float(r["tflops"]) > 0 and float(r["gbps"]) > 0
    summary = (tmp_path / f"{STEM}_summary.md").read_text()
    assert "bigmodel against PyTorch's best" in summary and "linear_relu" in summary
    assert "- CPU level: " in summary and "- run time: " in summary
    assert os.path.getsize(tmp_path / f"{STEM}_linear_relu_fp32.png") > 1000

    # A second run of one case replaces that case's rows and keeps the others.
    argv2 = argv[:-2] + ["--modes", "fwd", "--ops", "linear_relu"]
    assert bench_main.main(argv2) == 0
    rows2 = _read(tmp_path / f"{STEM}.csv")
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
    assert [(r["provider"], bool(r["skipped"])) for r in rows] == [("torch-eager", False), ("bigmodel-x", True)]
    assert runner.skipped[0][1] == "bigmodel-x" and "not implemented" in runner.skipped[0][2]
    assert rows[1]["ms_p50"] == "" and "not implemented" in rows[1]["skipped"]


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


def _sleeper(seconds, calls=None):
    def call():
        if calls is not None:
            calls.append(1)
        time.sleep(seconds)

    return Provider("torch-slow", lambda inputs, seed: (call() or call))


def _slow_and_fast(seconds, calls):
    """A bwd case of a provider sleeping ``seconds`` a call (counted in ``calls``) and a no-op."""
    x = torch.randn(4, 4)
    return Case("linear_relu", "bwd", torch.float32, {"M": 4}, torch.device("cpu"), 1.0, 1.0,
                lambda seed: [x], [_sleeper(seconds, calls), Provider("bigmodel-fast", lambda i, s: (lambda: None))])


def test_provider_over_budget_is_skipped_with_its_first_time():
    calls = []
    case = _slow_and_fast(0.05, calls)
    runner = Runner(torch.device("cpu"), Budget(0.0, 4, 4, input_sets=1, provider_s=0.1), META)
    rows = {r["provider"]: r for r in runner.run(case)}
    # Set-up and the one warm-up call of the slow provider, then it is dropped: even 3 reps don't fit.
    assert len(calls) == 2
    assert rows["bigmodel-fast"]["ms_p50"] and not rows["bigmodel-fast"]["skipped"]
    reason = rows["torch-slow"]["skipped"]
    first = re.match(r"over budget: first timed call ([0-9.]+) ms, so even 3 calls need", reason)
    assert first and float(first.group(1)) >= 50 and reason.endswith("(budget 100 ms per provider)")
    assert rows["torch-slow"]["ms_p50"] == "" and rows["torch-slow"]["cpu_level"] == "AVX2 capped"
    summary = report.summary(list(rows.values()), "cpu")
    assert "Over budget" in summary and reason in summary
    # No budget: the same provider is timed.
    runner = Runner(torch.device("cpu"), Budget(0.0, 2, 2, input_sets=1), META)
    assert all(not r["skipped"] for r in runner.run(case))


def test_provider_near_budget_is_timed_with_fewer_reps():
    calls = []
    case = _slow_and_fast(0.02, calls)
    # 7 reps + memory call of 20 ms > 100 ms; 3 to 4 reps fit.
    runner = Runner(torch.device("cpu"), Budget(0.0, 7, 7, input_sets=2, provider_s=0.1), META)
    rows = {r["provider"]: r for r in runner.run(case)}
    assert not rows["torch-slow"]["skipped"] and rows["torch-slow"]["peak_mem_mb"] == ""
    assert rows["bigmodel-fast"]["peak_mem_mb"] != ""
    [(_, name, reps, _)] = runner.reduced
    assert name == "torch-slow" and 3 <= reps <= 4 and len(calls) == 2 + reps  # one set-up, one warm-up


def test_progress_lines_while_a_case_runs():
    """A line at once, then heartbeats while one slow case runs (`make bench` shows progress
    within 30 s however slow its first case)."""
    x = torch.randn(2, 2)
    cases = [Case("linear_relu", "fwd", torch.float32, {"M": m}, torch.device("cpu"), 1e6, 1.0,
                  lambda seed: [x], [_sleeper(0.01)]) for m in (1, 2)]
    budget = Budget(0.0, 1, 1, input_sets=1)
    out = io.StringIO()
    with Progress(cases, Estimator(cases, budget, lambda c: 1), stream=out, heartbeat_s=0.2) as progress:
        assert out.getvalue().startswith("bench [0/2]")
        progress.case_start(0, cases[0])
        progress.phase("torch-slow set-up")
        time.sleep(0.7)  # a case that runs long: heartbeats keep coming
        progress.case_done(0, cases[0], 0.7)
    lines = out.getvalue().splitlines()
    assert len(lines) >= 3 and all(ln.startswith("bench [") for ln in lines)
    assert any("torch-slow set-up" in ln and "left" in ln for ln in lines)


def test_estimate_learns_from_measured_cases():
    x = torch.randn(2, 2)
    cases = [Case("linear_relu", "fwd", torch.float32, {"M": m}, torch.device("cpu"), 1e9, 1.0,
                  lambda seed: [x], [_sleeper(0)]) for m in (1, 2, 3)]
    est = Estimator(cases, Budget(1.0, 5, 50, input_sets=1), lambda c: 1)
    est.observe(0, 10 * est.model[0])  # ten times slower than modelled
    assert est.left(1) == pytest.approx(20 * est.model[1])


def test_cpu_capability_caps_run_in_a_child(tmp_path):
    """--cpu-capability avx2 re-runs the bench with ATen, oneDNN and MKL capped before torch
    loads: the child's torch reports AVX2 and every row records it."""
    if "avx2" not in cpu_level.cpu_flags():
        pytest.skip("this CPU has no AVX2")
    argv = ["--cpu-capability", "avx2", "--smoke", "--device", "cpu", "--ops", "linear_relu", "--modes", "fwd",
            "--reps", "1", "--out", str(tmp_path), "--no-progress"]
    assert bench_main.main(argv) == 0
    rows = _read(tmp_path / "cpu_avx2.csv")
    native = cpu_level.native_level() == "avx2"
    assert rows and {r["cpu_level"] for r in rows} == {"AVX2 native" if native else "AVX2 capped"}
    assert "ONEDNN_MAX_CPU_ISA=AVX2 MKL_ENABLE_INSTRUCTIONS=AVX2" in (tmp_path / "cpu_avx2_summary.md").read_text()


def test_cpu_capability_env_and_refusal(monkeypatch):
    seen = {}
    monkeypatch.setattr(cpu_level.subprocess, "run", lambda cmd, env: seen.update(cmd=cmd, env=env)
                        or types.SimpleNamespace(returncode=0))
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "AVX2")
    assert cpu_level.relaunch(["--quick"], "avx512", replace=False) == 0
    assert seen["cmd"][1:] == ["-m", "bench", "--quick"] and seen["env"]["ATEN_CPU_CAPABILITY"] == "avx512"
    assert "ONEDNN_MAX_CPU_ISA" not in seen["env"]  # the top level caps nothing
    monkeypatch.setenv(cpu_level.RELAUNCHED, "avx2")  # a fresh process whose caps got lost: no loop
    with pytest.raises(SystemExit, match="did not reach"):
        cpu_level.relaunch(["--quick"], "avx2", replace=False)
    monkeypatch.delenv(cpu_level.RELAUNCHED)
    assert cpu_level.needs_relaunch("avx2", {"ATEN_CPU_CAPABILITY": "avx2"})
    assert not cpu_level.needs_relaunch("avx2", dict(cpu_level.LEVELS["avx2"]))
    with pytest.raises(SystemExit, match="lacks avx512f, avx512bw"):
        cpu_level.check_supported("avx512", {"avx2", "fma", "sse4_2"})
    env = {}  # torch.compile's cache per level: one compiled under other caps corrupts the heap
    assert cpu_level.isolate_compile_cache("avx2", env).endswith("_bench_avx2")
    assert cpu_level.isolate_compile_cache("avx512", {"TORCHINDUCTOR_CACHE_DIR": "/x"}) == "/x"
    assert cpu_level.native_level({"avx2", "fma"}) == "avx2"
    assert cpu_level.native_level({"avx", "sse4_2"}) == "default"


def test_bf16_without_native_bf16_keeps_targets_and_says_why(monkeypatch):
    monkeypatch.setattr(cpu_level, "native_bf16", lambda *a, **k: False)
    cpu = torch.device("cpu")
    args = bench_main.parse_args(["--device", "cpu"])
    scope = bench_main.bf16_scope(args, cpu, native_bf16=False)
    assert scope == "priority" and bench_main.bf16_scope(args, cpu, True) == "all"
    ops = ("linear_relu", "attention", "linear_gelu")
    cases = bench_main.build_cases(args, cpu, ops, ("fwd", "bwd"), [torch.float32, torch.bfloat16], None, scope)
    bf16 = [c for c in cases if c.dtype_name == "bf16" and not c.op.startswith("ceiling")]
    assert bf16 and all(c.priority and c.mode == "fwd" and c.op != "linear_gelu" for c in bf16)
    assert any(c.op == "linear_gelu" and c.priority for c in cases)  # its fp32 targets stay
    assert any(targets.names(c, "cpu") for c in bf16)  # the bf16 >= 3x targets are kept
    assert len(bf16) < len([c for c in cases if c.dtype_name == "fp32"])
    assert "not native" in bench_main._level_lines(cpu, "AVX2 capped", False, scope)[1]
    # The bf16 matmul ceiling: torch.mm is not timed (scalar loop), the converting GEMM is.
    case = next(c for c in ceilings.cases(cpu, [torch.bfloat16], tiny=True) if c.op == "ceiling_matmul")
    rows = Runner(cpu, Budget(0.0, 1, 1, input_sets=1), META).run(case)
    assert {r["provider"]: bool(r["skipped"]) for r in rows}["torch-mm"]
    assert "bf16 not native" in report.summary(rows, "cpu")


def test_targets_by_level_and_readme_table(tmp_path):
    step = "B=1024,layers=784-512-256-10"
    rows = [dict(op="mlp_step", mode="fwd+bwd", dtype="fp32", shape=step, provider=p, ms_p50=ms, tflops="1",
                 cpu_level=level, skipped="", device="cpu")
            for level in ("AVX2 capped",) for p, ms in (("bigmodel-optimize", "10"), ("torch-eager", "10.2"),
                                                       ("bigmodel-fused", "9"))]
    line = next(x for x in targets.table(rows, "cpu") if x.startswith("| 11 | mlp_step"))
    assert "1.02x" in line and ">= 1.03x" in line and line.endswith("| NO |")  # 1.03 at AVX2
    for r in rows:
        r["cpu_level"] = "AVX512+BF16 native"
    line = next(x for x in targets.table(rows, "cpu") if x.startswith("| 11 | mlp_step"))
    assert ">= 1.0x" in line and line.endswith("| yes |")
    report.write_csv(str(tmp_path / "cpu_avx512.csv"), rows)
    (tmp_path / "cpu_avx512_summary.md").write_text(
        "# x\n\n- device: AMD EPYC, 2 threads\n- CPU level: AVX512+BF16 native (no caps)\n"
        "- torch 2, triton 3, git abc123, latest run 2026-12-01T10:00:00Z: `python -m bench --quick`\n")
    stem, block = readme.render(str(tmp_path / "cpu_avx512_summary.md"))
    assert stem == "cpu_avx512"
    assert block.startswith("**AVX512+BF16 native** on AMD EPYC, 2 threads; run of 2026-12-01, git abc123")
    assert "| mlp_step fwd+bwd fp32 | B=1024, layers=784-512-256-10 | 10.2 (torch-eager) | 9 | 1.13x | >= 1.05x |" in block
    doc = tmp_path / "README.md"
    doc.write_text("a\n<!-- bench:cpu_avx512 -->\nold\n<!-- /bench:cpu_avx512 -->\nb\n")
    readme.write(str(doc), stem, block)
    assert "old" not in doc.read_text() and doc.read_text().endswith("<!-- /bench:cpu_avx512 -->\nb\n")


def test_a_linear_activation_op_is_one_table_entry(monkeypatch):
    """Issue 14's fused_linear rows: one LinearAct entry gives the op its sweep and providers."""
    import bigmodel
    import torch.nn.functional as F

    spec = linear_relu.LinearAct("fused_linear_gelu", lambda x, w, b: bigmodel.fused_linear(x, w, b, "gelu"),
                                 lambda x, w, b: F.gelu(F.linear(x, w, b)))
    monkeypatch.setitem(linear_relu.OPS, spec.op, spec)
    cpu = torch.device("cpu")
    cases = linear_relu.cases(cpu, ("fwd",), [torch.float32], quick=True, ops=(spec.op,))
    assert cases and {c.op for c in cases} == {spec.op} and any(c.priority for c in cases)
    case = linear_relu.case(16, 32, 24, "fwd", torch.float32, cpu, True, "", "M", op=spec.op)
    case.providers = [p for p in case.providers if "compile" not in p.name]
    runner = Runner(cpu, Budget(0.0, 1, 1, input_sets=1), META)
    rows = runner.run(case)
    assert {r["provider"] for r in rows if not r["skipped"]} >= {"bigmodel-cpp", "torch-eager", "bound-addmm"}
    assert not runner.mismatches and report.plot_families(spec.op, rows[0]["shape"])[1] == "M"
