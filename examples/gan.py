"""A conditional GAN on handwritten digits (generator: Linear+ReLU layers, Tanh out; discriminator:
Linear+LeakyReLU layers), eager vs bigmodel.optimize; saves generated digits beside real ones.

    python -m examples.gan            # 2000 steps; about 30 s on an idle 2-core CPU
    python -m examples.gan --quick    # a few steps (CI)

The recipe is the usual one for a fully connected GAN on small data: DCGAN's activations (ReLU in
G, LeakyReLU(0.2) in D, Tanh at G's output, data scaled to [-1, 1]) and its Adam (lr 2e-4, betas
(0.5, 0.999)); the class label as a one-hot input to G and through a projection in D (Miyato and
Koyama 2018), so that every digit is asked for; dropout in D and one-sided label smoothing
(Salimans et al. 2016), which keep D from winning outright on 1438 training images. The GAN works
at the digits' own 8x8 resolution; the PNG upsamples them the way the classifier example does.

A classifier fitted to the real training digits judges the samples: its confidence, how many
distinct classes it sees among the 64 samples (one or two: mode collapse) and how many are the class
they were asked for. Two distances, each over the same for real test digits, need no classifier:
"spread", the mean distance between two samples of the same class (near 0: each class collapsed to
one image), and "off data", the distance from a sample to its nearest training digit (above 1:
unlike any real digit; well below 1: copies of training digits).
"""
import os
import sys

import torch
import torch.nn as nn
import torch.nn.functional as F

if __package__ in (None, ""):  # `python examples/gan.py`
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    __package__ = "examples"

from examples import _common  # noqa: E402

LATENT, CLASSES, SIZE = 32, 10, 8


class Generator(nn.Module):
    """G(z, y): noise and a class label -> an 8x8 digit in [-1, 1]."""

    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(LATENT + CLASSES, 256), nn.ReLU(),
            nn.Linear(256, 512), nn.ReLU(),
            nn.Linear(512, SIZE * SIZE), nn.Tanh(),
        )

    def forward(self, z, y):
        return self.net(torch.cat([z, F.one_hot(y, CLASSES).to(z.dtype)], 1))


class Discriminator(nn.Module):
    """D(x, y): the logit that x is a real digit of class y. The label enters by projection,
    head(h) + <embed(y), h> with h the features of x: a one-hot label concatenated to x instead is
    still ignored after 2000 steps here (samples come out at chance for the class asked for)."""

    def __init__(self):
        super().__init__()
        # Dropout follows each activation, so it never sits between a Linear and its activation.
        self.features = nn.Sequential(
            nn.Linear(SIZE * SIZE, 512), nn.LeakyReLU(0.2), nn.Dropout(0.3),
            nn.Linear(512, 256), nn.LeakyReLU(0.2), nn.Dropout(0.3),
        )
        self.head = nn.Linear(256, 1)
        self.embed = nn.Embedding(CLASSES, 256)

    def forward(self, x, y):
        h = self.features(x)
        return self.head(h) + (self.embed(y) * h).sum(1, keepdim=True)


class GAN(nn.Module):
    def __init__(self):
        super().__init__()
        self.generator, self.discriminator = Generator(), Discriminator()


def train(gan, images, labels, steps, device, seed, batch=64):
    G, D = gan.generator, gan.discriminator
    opt_g = torch.optim.Adam(G.parameters(), lr=2e-4, betas=(0.5, 0.999))
    opt_d = torch.optim.Adam(D.parameters(), lr=2e-4, betas=(0.5, 0.999))
    bce = nn.BCEWithLogitsLoss()  # D ends in a logit: the stable form of Sigmoid + BCELoss
    torch.manual_seed(seed)  # dropout draws the same masks for every variant
    g = torch.Generator().manual_seed(seed)  # same batches, noise and labels for every variant
    ones, zeros = torch.ones(batch, 1, device=device), torch.zeros(batch, 1, device=device)
    real_target = torch.full((batch, 1), 0.9, device=device)  # one-sided label smoothing
    clock = _common.Clock(device)
    hist = {"step": [], "d": [], "g": []}
    for step in range(steps):
        i = torch.randint(len(images), (batch,), generator=g).to(device)
        z = torch.randn(batch, LATENT, generator=g).to(device)
        y_fake = torch.randint(CLASSES, (batch,), generator=g).to(device)
        if step == 2:  # the first steps pay for lazy initialisation: not timed
            clock.seconds, clock.samples = 0.0, 0
        with clock:
            fake = G(z, y_fake)
            opt_d.zero_grad(set_to_none=True)
            loss_d = bce(D(images[i], labels[i]), real_target) + bce(D(fake.detach(), y_fake), zeros)
            loss_d.backward()
            opt_d.step()
            opt_g.zero_grad(set_to_none=True)
            loss_g = bce(D(fake, y_fake), ones)
            loss_g.backward()
            opt_g.step()
        clock.samples += batch
        if step % 25 == 0 or step == steps - 1:
            hist["step"].append(step + 1)
            hist["d"].append(loss_d.item())
            hist["g"].append(loss_g.item())
    return hist, clock.rate


def digit_classifier(images, labels):
    """The judge: a softmax (logistic) regression fitted to real digits, test accuracy 0.96. It is
    unsure of uniform noise (confidence 0.6) and of the mean of all digits (0.5), where an MLP or a
    kNN is sure of that mean (0.9 and more): a judge must not be sure of a blob."""
    from sklearn.linear_model import LogisticRegression

    return LogisticRegression(max_iter=2000).fit(images.cpu().numpy(), labels.cpu().numpy())


def spread(images, labels):
    """Mean distance between two different images of the same class."""
    same = (labels[:, None] == labels[None]) & ~torch.eye(len(labels), dtype=torch.bool, device=labels.device)
    return torch.cdist(images, images)[same].mean().item()


def off_data(images, train_images):
    """Mean distance from each image to its nearest training image."""
    return torch.cdist(images, train_images).min(1).values.mean().item()


def judge(classifier, images, labels, real=None, train_images=None):
    """[classifier confidence, distinct classes seen, fraction seen as ``labels``] and, given the real
    digits ``real`` (same labels) and the training digits, [spread, off data], each over real's."""
    p = torch.from_numpy(classifier.predict_proba(images.cpu().numpy()))
    confidence, seen = p.max(1)  # classes are 0..9, so the column is the class
    out = [confidence.mean().item(), len(seen.unique()), (seen == labels.cpu()).float().mean().item()]
    if real is not None:
        out += [spread(images, labels) / spread(real, labels),
                off_data(images, train_images) / off_data(real, train_images)]
    return out


def save_grid(path, panels):
    """One 8x8 grid of digits per panel ({title: images in [-1, 1]}), side by side."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 4.6), squeeze=False)
    for ax, (title, s) in zip(axes[0], panels.items()):
        s = F.interpolate(s.reshape(64, 1, SIZE, SIZE).float().cpu(), size=(28, 28), mode="bilinear",
                          align_corners=False)
        s = F.pad(s, (2, 2, 2, 2), value=0.0)  # grey lines between cells
        grid = s.reshape(8, 8, 32, 32).permute(0, 2, 1, 3).reshape(256, 256)
        ax.imshow(grid.numpy(), cmap="gray", vmin=-1, vmax=1)
        ax.set_title(title)
        ax.axis("off")
    fig.suptitle("cell i (reading order) is a digit of class i mod 10")
    fig.tight_layout(rect=(0, 0, 1, 0.95))  # room for the suptitle
    fig.savefig(path, dpi=100)
    plt.close(fig)
    print(f"wrote {path}")


def main():
    args = _common.parse_args(__doc__.splitlines()[0], "default: 2000")
    steps = _common.pick_steps(args, full=2000)
    torch.manual_seed(args.seed)
    xtr, ytr, xte, yte = _common.digits(args.device, size=SIZE, seed=args.seed)
    images, test_images = xtr.flatten(1) * 2 - 1, xte.flatten(1) * 2 - 1  # to the generator's tanh range
    print(f"digits: {len(images)} training images, {SIZE}x{SIZE}; device {args.device}; {steps} steps")
    classifier = digit_classifier(images, ytr)
    # 64 cells, cell i asks for class i % 10; the real panel holds unseen test digits in the same order.
    asked = torch.arange(64, device=args.device) % CLASSES
    real = torch.stack([test_images[yte == c][n // CLASSES] for n, c in enumerate(asked.tolist())])
    conf, classes, as_labelled = judge(classifier, real, asked)
    print(f"judge on these real test digits: confidence {conf:.3f}, {classes} classes, "
          f"{as_labelled:.3f} as labelled")
    gan = GAN().to(args.device)
    z = torch.randn(64, LATENT, generator=torch.Generator().manual_seed(args.seed + 1)).to(args.device)
    rows, curves, rates, panels = [], {}, {}, {"real test digits": real}
    for name, m in _common.variants(gan, args):
        hist, rate = train(m, images, ytr, steps, args.device, args.seed)
        with torch.no_grad():
            panels[f"{name}: generated"] = samples = m.generator(z, asked)
        curves[name], rates[name] = hist, rate
        rows.append([name, hist["d"][-1], *judge(classifier, samples, asked, real, images), rate])
    _common.comparison(["model", "D loss", "judge confidence", "classes in 64", "as asked", "spread",
                        "off data"], rows, rates)
    save_grid(os.path.join(args.out, "gan_samples.png"), panels)
    _common.plot(os.path.join(args.out, "gan.png"), [
        ("discriminator loss", "step", {n: (h["step"], h["d"]) for n, h in curves.items()}),
        ("generator loss", "step", {n: (h["step"], h["g"]) for n, h in curves.items()}),
    ], bars=("train samples/s", rates))
    return rows


if __name__ == "__main__":
    main()
