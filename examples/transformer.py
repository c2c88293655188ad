"""A small Transformer encoder classifier on a generated sequence task, eager vs bigmodel.optimize.

    python -m examples.transformer            # 600 steps; CPU in a few minutes
    python -m examples.transformer --quick    # a few steps (CI)

Task: variable-length sequences (8 to 32 tokens over a vocabulary of 10, padded to 32 and masked
with key_padding_mask); the label is the sequence's most frequent token (sequences with a tie are
redrawn). Fresh batches every step from a seeded generator, the same for both models; the test set
is 2048 held-out sequences. The model is nn.TransformerEncoder (2 layers, d_model 64, 4 heads,
batch_first) with masked mean pooling: bigmodel.optimize swaps its attention for bigmodel's and
fuses each layer's linear1 + ReLU.
"""
import os
import sys

import torch
import torch.nn as nn

if __package__ in (None, ""):  # `python examples/transformer.py`
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    __package__ = "examples"

from examples import _common  # noqa: E402

VOCAB, MIN_LEN, MAX_LEN = 10, 8, 32
PAD = 0  # tokens are 1..VOCAB


def make_batch(n, g):
    """(tokens (n, MAX_LEN) with PAD after each sequence's end, labels (n,) = mode - 1)."""
    tokens, labels = [], []
    while sum(len(t) for t in tokens) < n:
        lengths = torch.randint(MIN_LEN, MAX_LEN + 1, (2 * n,), generator=g)
        t = torch.randint(1, VOCAB + 1, (2 * n, MAX_LEN), generator=g)
        t[torch.arange(MAX_LEN) >= lengths[:, None]] = PAD
        counts = torch.zeros(2 * n, VOCAB + 1, dtype=torch.long).scatter_add_(1, t, torch.ones_like(t))[:, 1:]
        top2 = counts.topk(2, dim=1).values
        keep = top2[:, 0] > top2[:, 1]  # a unique mode
        tokens.append(t[keep])
        labels.append(counts[keep].argmax(1))
    return torch.cat(tokens)[:n], torch.cat(labels)[:n]


class SeqClassifier(nn.Module):
    def __init__(self, d_model=64, heads=4, layers=2, ff=128, activation="gelu"):
        super().__init__()
        self.embed = nn.Embedding(VOCAB + 1, d_model, padding_idx=PAD)
        self.pos = nn.Parameter(torch.randn(MAX_LEN, d_model) * 0.02)
        # GELU, as GPT-2 and BERT use: bigmodel.optimize fuses it into linear1 (FusedLinear).
        layer = nn.TransformerEncoderLayer(d_model, heads, ff, dropout=0.0, activation=activation,
                                           batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.head = nn.Linear(d_model, VOCAB)

    def forward(self, tokens):
        pad = tokens == PAD
        x = self.embed(tokens) + self.pos[: tokens.shape[1]]
        x = self.encoder(x, src_key_padding_mask=pad)
        keep = (~pad).unsqueeze(-1).to(x.dtype)
        return self.head((x * keep).sum(1) / keep.sum(1))


def train(model, test, steps, device, seed, batch=64):
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    loss_fn = nn.CrossEntropyLoss()
    torch.manual_seed(seed)  # dropout draws the same masks for every variant
    g = torch.Generator().manual_seed(seed)
    clock = _common.Clock(device)
    hist = {"step": [], "loss": [], "acc": []}
    running = []
    every = min(100, steps) if steps >= 50 else steps  # short runs: evaluate once, at the end
    for step in range(steps):
        x, y = make_batch(batch, g)
        x, y = x.to(device), y.to(device)
        if step == 2:  # the first steps pay for lazy initialisation: not timed
            clock.seconds, clock.samples = 0.0, 0
        with clock:
            opt.zero_grad(set_to_none=True)
            loss = loss_fn(model(x), y)
            loss.backward()
            opt.step()
        clock.samples += batch
        running.append(loss.item())
        if (step + 1) % every == 0 or step == steps - 1:
            hist["step"].append(step + 1)
            hist["loss"].append(sum(running) / len(running))
            hist["acc"].append(_common.accuracy(model, *test))
            running = []
    return hist, clock.rate


def main():
    args = _common.parse_args(__doc__.splitlines()[0], "default: 600")
    steps = _common.pick_steps(args, full=600)
    torch.manual_seed(args.seed)
    test = tuple(t.to(args.device) for t in make_batch(256 if args.quick else 2048, torch.Generator().manual_seed(args.seed + 10_000)))
    print(f"most-frequent-token task: vocab {VOCAB}, lengths {MIN_LEN}..{MAX_LEN}; device {args.device}; "
          f"{steps} steps")
    model = SeqClassifier().to(args.device)
    return _common.compare_training(
        model, args, lambda m: train(m, test, steps, args.device, args.seed), "transformer.png")


if __name__ == "__main__":
    main()
