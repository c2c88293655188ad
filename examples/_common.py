"""What the examples share: flags, device, the digits data, timing, the comparison table and plots."""
import argparse
import copy
import os
import time

import torch
import torch.nn.functional as F

OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "out")


def parse_args(description, steps_help):
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--steps", type=int, default=None, help=f"train for N optimizer steps ({steps_help})")
    p.add_argument("--quick", action="store_true", help="a few steps only (what CI runs)")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when present)")
    p.add_argument("--compile", action="store_true", help="also wrap both models in torch.compile")
    p.add_argument("--out", default=OUT, help="where the plot goes (default: examples/out)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    args.device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    os.makedirs(args.out, exist_ok=True)
    return args


def pick_steps(args, full, quick=5):
    return quick if args.quick else (args.steps if args.steps is not None else full)


def digits(device, size=28, seed=0):
    """scikit-learn's 8x8 handwritten digits (they ship with it: no download), upsampled to
    size x size, scaled to [0, 1]; a stratified 80/20 train/test split fixed by ``seed``."""
    from sklearn.datasets import load_digits

    data = load_digits()
    x = torch.tensor(data.images, dtype=torch.float32).unsqueeze(1) / 16.0
    x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False).clamp(0, 1)
    y = torch.tensor(data.target, dtype=torch.long)
    g = torch.Generator().manual_seed(seed)
    train, test = [], []
    for c in range(10):
        idx = (y == c).nonzero().flatten()
        idx = idx[torch.randperm(len(idx), generator=g)]
        cut = int(round(0.8 * len(idx)))
        train.append(idx[:cut])
        test.append(idx[cut:])
    train, test = torch.cat(train), torch.cat(test)
    return x[train].to(device), y[train].to(device), x[test].to(device), y[test].to(device)


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class Clock:
    """Wall time of the timed sections only (syncs the GPU at both ends)."""

    def __init__(self, device):
        self.device, self.seconds, self.samples = device, 0.0, 0

    def __enter__(self):
        sync(self.device)
        self._t = time.perf_counter()
        return self

    def __exit__(self, *exc):
        sync(self.device)
        self.seconds += time.perf_counter() - self._t

    @property
    def rate(self):
        return self.samples / self.seconds if self.seconds else float("nan")


def variants(model, args):
    """[('eager', model), ('bigmodel', bigmodel.optimize(copy))], same initial weights."""
    import bigmodel

    eager = copy.deepcopy(model)
    fused = bigmodel.optimize(copy.deepcopy(model))
    print(fused.bigmodel_report)
    out = [("eager", eager), ("bigmodel", fused)]
    if args.compile:
        out = [(n + "+compile", torch.compile(m)) for n, m in out]
    return out


def table(headers, rows):
    """Print a plain text table."""
    cells = [[str(h) for h in headers]] + [[c if isinstance(c, str) else f"{c:.4g}" for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    lines = ["  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths))) for r in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    print("\n".join(lines))


def accuracy(model, x, y, batch=512):
    """Fraction of ``x`` classified as ``y``, in eval mode and batches (the model is left in train mode)."""
    model.eval()
    with torch.no_grad():
        correct = sum((model(x[i:i + batch]).argmax(1) == y[i:i + batch]).sum().item()
                      for i in range(0, len(x), batch))
    model.train()
    return correct / len(x)


def comparison(headers, rows, rates):
    """Print the variants' table: ``rows`` are [name, metrics..., samples/s], extended with the
    speed against the first variant (eager)."""
    base = rates[next(iter(rates))]
    for r in rows:
        r.append(f"{r[-1] / base:.2f}x")
    table(list(headers) + ["train samples/s", "speed vs eager"], rows)


def compare_training(model, args, train, png_name):
    """Train every variant of ``model`` (see :func:`variants`) with ``train(m) -> (history,
    samples/s)``, print the accuracy/loss/speed table and write the loss/accuracy/speed plot to
    args.out/png_name. Returns the table's rows."""
    rows, curves, rates = [], {}, {}
    for name, m in variants(model, args):
        hist, rate = train(m)
        curves[name], rates[name] = hist, rate
        rows.append([name, hist["acc"][-1], hist["loss"][-1], rate])
    comparison(["model", "test accuracy", "train loss"], rows, rates)
    plot(os.path.join(args.out, png_name), training_panels(curves), bars=("train samples/s", rates))
    return rows


def training_panels(curves):
    """Loss and test-accuracy panels for :func:`plot` from {variant: {"step", "loss", "acc"}}."""
    return [
        ("train loss", "step", {n: (h["step"], h["loss"]) for n, h in curves.items()}),
        ("test accuracy", "step", {n: (h["step"], h["acc"]) for n, h in curves.items()}),
    ]


def plot(path, panels, bars=None):
    """Line panels [(title, xlabel, {label: (xs, ys)})] and an optional bar panel
    (title, {label: value}) side by side; saves a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = len(panels) + (bars is not None)
    fig, axes = plt.subplots(1, n, figsize=(4.8 * n, 3.6), squeeze=False)
    for ax, (title, xlabel, series) in zip(axes[0], panels):
        for i, (label, (xs, ys)) in enumerate(series.items()):
            # Dashed second line: the two runs often overlap exactly.
            ax.plot(xs, ys, label=label, linestyle="-" if i == 0 else "--",
                    marker="o" if len(xs) < 30 else None, markersize=3)
        ax.set_title(title)
        ax.set_xlabel(xlabel)
        ax.legend()
        ax.grid(alpha=0.3)
    if bars is not None:
        ax = axes[0][-1]
        title, values = bars
        ax.bar(list(values), list(values.values()), color=["tab:blue", "tab:orange", "tab:green", "tab:red"][:len(values)])
        ax.set_title(title)
        ax.grid(alpha=0.3, axis="y")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    print(f"wrote {path}")
