"""The examples run end to end for a few steps (--quick) and write their plots."""
import importlib
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.parametrize("name", ["classifier", "transformer", "gan"])
def test_example_quick(name, tmp_path, monkeypatch, capsys):
    monkeypatch.syspath_prepend(ROOT)
    monkeypatch.setattr(sys, "argv", [name, "--quick", "--device", "cpu", "--out", str(tmp_path)])
    module = importlib.import_module(f"examples.{name}")
    rows = module.main()
    assert [r[0] for r in rows] == ["eager", "bigmodel"]
    out = capsys.readouterr().out
    assert "bigmodel.optimize: fused" in out and "speed vs eager" in out
    pngs = sorted(p.name for p in tmp_path.iterdir())
    assert f"{name}.png" in pngs
    if name == "gan":
        assert "gan_samples.png" in pngs
    # Same initial weights and batches: the two runs agree after a few steps.
    assert rows[0][1] == pytest.approx(rows[1][1], rel=1e-3, abs=1e-3)


def test_example_runs_as_a_script():
    r = subprocess.run([sys.executable, os.path.join(ROOT, "examples", "classifier.py"), "--help"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and "--quick" in r.stdout
