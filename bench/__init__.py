"""bigmodel's benchmark suite: ``python -m bench`` (``make bench``).

Measures every bigmodel backend on the device against PyTorch's best on the same inputs, in
the same run, interleaved, and writes long-format CSV rows, a Markdown summary and plots.

  core.py        Case, Provider, Skip, and the fwd / bwd / fwd+bwd wrappers
  timing.py      interleaved timers: CUDA events (GPU), wall clock (CPU)
  memory.py      peak memory of one call (CUDA allocator, or RSS high-water mark on CPU)
  ceilings.py    the limits measured in the same run: a large matmul, a large copy
  linear_relu.py attention.py end_to_end.py   the cases and their providers
  runner.py      runs cases into rows (set-up, warm-up, budget check, interleaved timing)
  progress.py    progress lines and the run-time estimate
  cpu_level.py   --cpu-capability: ATen, oneDNN and MKL capped in a fresh process
  report.py      CSV, summary and plots
  targets.py     the issues' speed targets, per CPU level
  readme.py      the README's results table, from a run's summary and CSV
"""
