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


def test_gan_judge_tells_digits_from_collapse(monkeypatch):
    """The GAN's judge: real digits score high, one image repeated 64 times scores as collapsed."""
    monkeypatch.syspath_prepend(ROOT)
    import torch

    from examples import _common, gan

    xtr, ytr, xte, yte = _common.digits("cpu", size=gan.SIZE)
    train, test = xtr.flatten(1) * 2 - 1, xte.flatten(1) * 2 - 1
    classifier = gan.digit_classifier(train, ytr)
    labels = torch.arange(64) % 10
    real = torch.stack([test[yte == c][n // 10] for n, c in enumerate(labels.tolist())])
    other = torch.stack([test[yte == c][n // 10 + 7] for n, c in enumerate(labels.tolist())])
    confidence, classes, as_asked, spread, off_data = gan.judge(classifier, other, labels, real, train)
    assert confidence > 0.85 and classes == 10 and as_asked > 0.9
    assert 0.8 < spread < 1.25 and 0.8 < off_data < 1.25
    collapsed = real[3].expand(64, -1)  # every cell the same "3"
    confidence, classes, as_asked, spread, off_data = gan.judge(classifier, collapsed, labels, real, train)
    assert classes == 1 and as_asked < 0.2 and spread == 0
    noise = torch.rand(64, gan.SIZE ** 2, generator=torch.Generator().manual_seed(0)) * 2 - 1
    confidence, classes, as_asked, spread, off_data = gan.judge(classifier, noise, labels, real, train)
    assert confidence < 0.75 and off_data > 2
