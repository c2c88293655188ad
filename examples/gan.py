"""A GAN whose generator and discriminator are Linear+ReLU stacks, trained on handwritten digits,
eager vs bigmodel.optimize; saves a grid of generated digits as PNG.

    python -m examples.gan            # 2000 steps; CPU in a few minutes
    python -m examples.gan --quick    # a few steps (CI)
"""
import os
import sys

import torch
import torch.nn as nn

if __package__ in (None, ""):  # `python examples/gan.py`
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    __package__ = "examples"

from examples import _common  # noqa: E402

LATENT = 64


class GAN(nn.Module):
    """The seed's GAN shape: both networks are stacks of Linear+ReLU."""

    def __init__(self):
        super().__init__()
        self.generator = nn.Sequential(
            nn.Linear(LATENT, 256), nn.ReLU(),
            nn.Linear(256, 512), nn.ReLU(),
            nn.Linear(512, 784), nn.Tanh(),
        )
        # Dropout after each ReLU keeps the discriminator from winning outright (as in the first
        # GANs); it does not sit between a Linear and its ReLU, so fusion is unaffected.
        self.discriminator = nn.Sequential(
            nn.Linear(784, 512), nn.ReLU(), nn.Dropout(0.3),
            nn.Linear(512, 256), nn.ReLU(), nn.Dropout(0.3),
            nn.Linear(256, 1),
        )


def train(gan, images, steps, device, seed, batch=64):
    G, D = gan.generator, gan.discriminator
    opt_g = torch.optim.Adam(G.parameters(), lr=2e-4, betas=(0.5, 0.999))
    opt_d = torch.optim.Adam(D.parameters(), lr=2e-4, betas=(0.5, 0.999))
    bce = nn.BCEWithLogitsLoss()
    torch.manual_seed(seed)  # dropout draws the same masks for every variant
    g = torch.Generator().manual_seed(seed)  # same batches and noise for every variant
    ones, zeros = torch.ones(batch, 1, device=device), torch.zeros(batch, 1, device=device)
    real_label = torch.full((batch, 1), 0.9, device=device)  # one-sided label smoothing
    clock = _common.Clock(device)
    hist = {"step": [], "d": [], "g": []}
    for step in range(steps):
        real = images[torch.randint(len(images), (batch,), generator=g).to(device)]
        z = torch.randn(batch, LATENT, generator=g).to(device)
        if step == 2:  # the first steps pay for lazy initialisation: not timed
            clock.seconds, clock.samples = 0.0, 0
        with clock:
            fake = G(z)
            opt_d.zero_grad(set_to_none=True)
            loss_d = bce(D(real), real_label) + bce(D(fake.detach()), zeros)
            loss_d.backward()
            opt_d.step()
            opt_g.zero_grad(set_to_none=True)
            loss_g = bce(D(fake), ones)
            loss_g.backward()
            opt_g.step()
        clock.samples += batch
        if step % 25 == 0 or step == steps - 1:
            hist["step"].append(step + 1)
            hist["d"].append(loss_d.item())
            hist["g"].append(loss_g.item())
    return hist, clock.rate


def save_grid(path, samples_by_name):
    """One 8x8 grid of generated digits per variant, side by side."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(samples_by_name), figsize=(4.2 * len(samples_by_name), 4.4), squeeze=False)
    for ax, (name, s) in zip(axes[0], samples_by_name.items()):
        s = s.reshape(8, 8, 28, 28).permute(0, 2, 1, 3).reshape(8 * 28, 8 * 28)
        ax.imshow(s.cpu().numpy(), cmap="gray", vmin=-1, vmax=1)
        ax.set_title(f"{name}: generated digits")
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    print(f"wrote {path}")


def main():
    args = _common.parse_args(__doc__.splitlines()[0], "default: 2000")
    steps = _common.pick_steps(args, full=2000)
    torch.manual_seed(args.seed)
    xtr, _, _, _ = _common.digits(args.device, seed=args.seed)
    images = xtr.reshape(len(xtr), 784) * 2 - 1  # to the generator's tanh range
    print(f"digits: {len(images)} training images, 28x28; device {args.device}; {steps} steps")
    gan = GAN().to(args.device)
    z = torch.randn(64, LATENT, generator=torch.Generator().manual_seed(args.seed + 1)).to(args.device)
    rows, curves, rates, samples = [], {}, {}, {}
    for name, m in _common.variants(gan, args):
        hist, rate = train(m, images, steps, args.device, args.seed)
        with torch.no_grad():
            samples[name] = m.generator(z)
        curves[name], rates[name] = hist, rate
        rows.append([name, hist["d"][-1], hist["g"][-1], rate])
    _common.comparison(["model", "D loss", "G loss"], rows, rates)
    save_grid(os.path.join(args.out, "gan_samples.png"), samples)
    _common.plot(os.path.join(args.out, "gan.png"), [
        ("discriminator loss", "step", {n: (h["step"], h["d"]) for n, h in curves.items()}),
        ("generator loss", "step", {n: (h["step"], h["g"]) for n, h in curves.items()}),
    ], bars=("train samples/s", rates))
    return rows


if __name__ == "__main__":
    main()
