"""The seed's MLP classifier, trained on real handwritten digits, eager vs bigmodel.optimize.

    python -m examples.classifier            # ~40 epochs; CPU in well under a minute
    python -m examples.classifier --quick    # a few steps (CI)

Data: scikit-learn's digits (1797 8x8 images, shipped with scikit-learn), upsampled to 28x28 so
the seed's 784-input network applies unchanged; stratified 80/20 train/test split.
"""
import os
import sys

import torch
import torch.nn as nn

if __package__ in (None, ""):  # `python examples/classifier.py`
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    __package__ = "examples"

from examples import _common  # noqa: E402
from examples.seed import Classifier  # noqa: E402  (the model this example trains)


def train(model, data, steps, device, seed, batch=64):
    xtr, ytr, xte, yte = data
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    loss_fn = nn.CrossEntropyLoss()
    torch.manual_seed(seed)  # dropout draws the same masks for every variant
    g = torch.Generator().manual_seed(seed)  # the same batches, in the same order, for every variant
    per_epoch = (len(xtr) + batch - 1) // batch
    clock = _common.Clock(device)
    hist = {"step": [], "loss": [], "acc": []}
    step, running = 0, []
    while step < steps:
        order = torch.randperm(len(xtr), generator=g).to(device)
        for i in range(per_epoch):
            idx = order[i * batch:(i + 1) * batch]
            xb, yb = xtr[idx], ytr[idx]
            if step == 2:  # the first steps pay for lazy initialisation: not timed
                clock.seconds, clock.samples = 0.0, 0
            with clock:
                opt.zero_grad(set_to_none=True)
                loss = loss_fn(model(xb), yb)
                loss.backward()
                opt.step()
            clock.samples += len(idx)
            running.append(loss.item())
            step += 1
            if step % per_epoch == 0 or step == steps:
                hist["step"].append(step)
                hist["loss"].append(sum(running) / len(running))
                hist["acc"].append(_common.accuracy(model, xte, yte))
                running = []
            if step == steps:
                break
    return hist, clock.rate


def main():
    args = _common.parse_args(__doc__.splitlines()[0], "default: 40 epochs of 23 batches")
    steps = _common.pick_steps(args, full=40 * 23)
    torch.manual_seed(args.seed)
    data = _common.digits(args.device, seed=args.seed)
    print(f"digits: {len(data[0])} train / {len(data[2])} test images, 28x28; device {args.device}; {steps} steps")
    model = Classifier().to(args.device)
    return _common.compare_training(
        model, args, lambda m: train(m, data, steps, args.device, args.seed), "classifier.png")


if __name__ == "__main__":
    main()
