"""End-to-end rows: one optimizer step (forward, loss, backward, Adam) of the seed's models.

  mlp_step          the seed's classifier 784-512-256-10 (one shared nn.ReLU), cross-entropy
  transformer_step  one nn.TransformerEncoderLayer (batch_first, dropout 0), MSE to a target
  transformer_gelu_step  the same layer with activation="gelu" (GPT-2 / BERT's FFN)
  gan_step          a discriminator step then a generator step, as GANs are written (issue 14):
                    G Linear+ReLU with a Tanh output, D Linear+LeakyReLU(0.2) with a Sigmoid
                    output, BCE

Providers: torch-eager (the model as written), torch-compile (the same model compiled,
default mode), bigmodel-fused (the model written with bigmodel.nn modules, where that is a
plain swap) and bigmodel-optimize (bigmodel.optimize of the model as written). Every
provider starts from the same weights. Beside them, not a contender, bound-no-relu (MLP and
GAN): the model with its ReLUs removed, the most a fusion that keeps the GEMMs could win.
FLOPs count the GEMMs (and attention) of the step: forward once, backward twice the forward,
minus the input gradients nobody asks for.
"""
import copy

import torch
import torch.nn as nn
import torch.nn.functional as F

import bigmodel
from examples.seed import Classifier as SeedMLP
from bench.core import Case, Provider, Skip, randn
from bench.attention import flops as attention_flops


class FusedMLP(nn.Module):
    """The same classifier with bigmodel's fused layers (same parameter names)."""

    def __init__(self):
        super().__init__()
        self.fc1 = bigmodel.nn.FusedLinearReLU(784, 512)
        self.fc2 = bigmodel.nn.FusedLinearReLU(512, 256)
        self.fc3 = nn.Linear(256, 10)

    def forward(self, x):
        return self.fc3(self.fc2(self.fc1(x)))


# (eager module, bigmodel.nn.FusedLinear's activation arguments) per activation of the stacks.
_ACTS = {"relu": (nn.ReLU, dict(activation="relu")),
         "leaky_relu": (lambda: nn.LeakyReLU(0.2), dict(activation="leaky_relu", negative_slope=0.2)),
         "tanh": (nn.Tanh, dict(activation="tanh")), "sigmoid": (nn.Sigmoid, dict(activation="sigmoid"))}


def _stack(dims, fused, hidden, last):
    """Linear + ``hidden`` activation layers over ``dims``, the last Linear followed by ``last``
    (activation names of _ACTS). Fused: bigmodel.nn.FusedLinear with nn.Identity where the
    activation was, so indices and state_dict keys are the eager model's."""
    layers = []
    for i, (a, b) in enumerate(zip(dims[:-1], dims[1:])):
        module, fused_args = _ACTS[last if i == len(dims) - 2 else hidden]
        layers += [bigmodel.nn.FusedLinear(a, b, **fused_args), nn.Identity()] if fused else [nn.Linear(a, b), module()]
    return nn.Sequential(*layers)


class GAN(nn.Module):
    """Generator 100-256-512-1024-784 (ReLU, Tanh out) and discriminator 784-512-256-1
    (LeakyReLU 0.2, Sigmoid out)."""

    G_DIMS = (100, 256, 512, 1024, 784)
    D_DIMS = (784, 512, 256, 1)

    def __init__(self, fused=False):
        super().__init__()
        self.G = _stack(self.G_DIMS, fused, "relu", "tanh")
        self.D = _stack(self.D_DIMS, fused, "leaky_relu", "sigmoid")


def _linear_flops(batch, dims, input_grad):
    """GEMM FLOPs of a Linear stack over one forward and backward."""
    fwd = sum(2.0 * batch * a * b for a, b in zip(dims[:-1], dims[1:]))
    skipped_dx = 0.0 if input_grad else 2.0 * batch * dims[0] * dims[1]
    return fwd, fwd + 2 * fwd - skipped_dx


def _load_same(model, reference):
    # Same parameter names by construction (FusedLinearReLU is an nn.Linear); strict load.
    model.load_state_dict(reference.state_dict())
    return model


def _train_provider(name, build, step, dtype, device):
    """A provider whose model (built once per case) takes one Adam step per call."""
    state = {}

    def setup(inputs, seed):
        if "model" not in state:
            model = build()
            if model is None:
                raise Skip("not applicable")
            model = model.to(device=device, dtype=dtype).train()
            params = [p for p in model.parameters() if p.requires_grad]
            state["model"] = model
            state["opts"] = {"all": torch.optim.Adam(params, lr=1e-4)}
            if isinstance(model, GAN):
                state["opts"] = {"G": torch.optim.Adam(model.G.parameters(), lr=1e-4),
                                 "D": torch.optim.Adam(model.D.parameters(), lr=1e-4)}
        model, opts = state["model"], state["opts"]

        def run():
            return step(model, opts, inputs)

        run()
        return run

    return Provider(name, setup)


def _optimized(make):
    def build():
        return bigmodel.optimize(make())

    return build


def _compiled(make):
    def build():
        model = make()
        if isinstance(model, GAN):  # the step calls G and D, not the GAN's forward
            model.G, model.D = (torch.compile(m, dynamic=False) for m in (model.G, model.D))
            return model
        return torch.compile(model, dynamic=False)

    return build


def _without_relu(make):
    """The model with every hidden activation (nn.ReLU, nn.LeakyReLU) replaced by nn.Identity:
    the same GEMMs and everything else, no activation there. Not a contender (its function
    differs): it is the ceiling of any Linear + activation fusion that keeps the GEMMs."""
    def build():
        model = make()
        for parent in list(model.modules()):
            for name, child in parent.named_children():
                if isinstance(child, (nn.ReLU, nn.LeakyReLU)):
                    setattr(parent, name, nn.Identity())
        return model

    return build


def _providers(make_eager, make_fused, step, dtype, device, quick, bound=False):
    torch.manual_seed(0)
    reference = make_eager()

    def eager():
        return copy.deepcopy(reference)

    out = [_train_provider("torch-eager", eager, step, dtype, device)]
    out.append(_train_provider("torch-compile", _compiled(eager), step, dtype, device))
    if make_fused is not None:
        out.append(_train_provider("bigmodel-fused", lambda: _load_same(make_fused(), reference),
                                   step, dtype, device))
    out.append(_train_provider("bigmodel-optimize", _optimized(eager), step, dtype, device))
    if bound:
        out.append(_train_provider("bound-no-relu", _without_relu(eager), step, dtype, device))
    return out


# ---------------------------------------------------------------------------------------------


def _mlp_step(model, opts, inputs):
    x, y = inputs
    opt = opts["all"]
    opt.zero_grad(set_to_none=True)
    loss = F.cross_entropy(model(x), y)
    loss.backward()
    opt.step()
    return loss


def mlp_case(device, dtype, quick, batch=1024):
    dims = (784, 512, 256, 10)
    _, total = _linear_flops(batch, dims, input_grad=False)

    def inputs(seed):
        gen = torch.Generator(device=device).manual_seed(seed)
        return [randn((batch, 784), dtype, device, seed),
                torch.randint(0, 10, (batch,), generator=gen, device=device)]

    return Case("mlp_step", "fwd+bwd", dtype, {"B": batch, "layers": "784-512-256-10"}, device,
                total, 0.0, inputs, _providers(SeedMLP, FusedMLP, _mlp_step, dtype, device, quick, bound=True),
                family="e2e", input_bytes=batch * 784 * 4)


def _transformer_step(model, opts, inputs):
    x, target = inputs
    opt = opts["all"]
    opt.zero_grad(set_to_none=True)
    loss = F.mse_loss(model(x), target)
    loss.backward()
    opt.step()
    return loss


def transformer_case(device, dtype, quick, activation="relu"):
    if device.type == "cuda":
        B, L, d, heads, ff = 8, 2048, 1024, 16, 4096
    else:
        B, L, d, heads, ff = 8, 256, 256, 4, 1024
    T = B * L
    lin_fwd = 2.0 * T * d * 3 * d + 2.0 * T * d * d + 2 * 2.0 * T * d * ff
    qkv_dx = 2.0 * T * d * 3 * d  # the input needs no gradient
    total = 3 * lin_fwd - qkv_dx + attention_flops(B, heads, L, L, d // heads, False, "fwd+bwd")

    def make():
        return nn.TransformerEncoderLayer(d, heads, ff, dropout=0.0, activation=activation, batch_first=True)

    def inputs(seed):
        return [randn((B, L, d), dtype, device, seed), randn((B, L, d), dtype, device, seed + 1)]

    shape = {"B": B, "L": L, "d_model": d, "heads": heads, "ff": ff}
    op = "transformer_step" if activation == "relu" else f"transformer_{activation}_step"
    return Case(op, "fwd+bwd", dtype, shape, device, total, 0.0, inputs,
                _providers(make, None, _transformer_step, dtype, device, quick),
                family="e2e", input_bytes=2 * B * L * d * 4)


def _gan_step(model, opts, inputs):
    real, z = inputs
    G, D = model.G, model.D
    ones = torch.ones(real.shape[0], 1, device=real.device, dtype=real.dtype)
    zeros = torch.zeros_like(ones)
    opts["D"].zero_grad(set_to_none=True)
    fake = G(z)
    d_loss = F.binary_cross_entropy(D(real), ones) + F.binary_cross_entropy(D(fake.detach()), zeros)
    d_loss.backward()
    opts["D"].step()
    opts["G"].zero_grad(set_to_none=True)
    g_loss = F.binary_cross_entropy(D(fake), ones)
    g_loss.backward()
    opts["G"].step()
    return g_loss


def gan_case(device, dtype, quick):
    batch = 8192 if device.type == "cuda" else 256
    g_fwd, g_train = _linear_flops(batch, GAN.G_DIMS, input_grad=False)
    d_fwd, d_train = _linear_flops(batch, GAN.D_DIMS, input_grad=False)
    _, d_train_dx = _linear_flops(batch, GAN.D_DIMS, input_grad=True)
    total = g_train + 2 * d_train + d_train_dx  # D on real and detached fake, then on fake for G

    def inputs(seed):
        return [randn((batch, 784), dtype, device, seed).clamp(-1, 1),
                randn((batch, 100), dtype, device, seed + 1)]

    shape = {"B": batch, "G": "100-256-512-1024-784", "D": "784-512-256-1"}
    return Case("gan_step", "fwd+bwd", dtype, shape, device, total, 0.0, inputs,
                _providers(GAN, lambda: GAN(fused=True), _gan_step, dtype, device, quick, bound=True),
                family="e2e", input_bytes=batch * 884 * 4)


OPS = ("mlp_step", "transformer_step", "transformer_gelu_step", "gan_step")


def cases(device, modes, dtypes, quick=False):
    """One case per model and dtype; a training step is a fwd+bwd row."""
    if "fwd+bwd" not in modes:
        return []
    out = []
    for dtype in dtypes:
        out += [mlp_case(device, dtype, quick), transformer_case(device, dtype, quick),
                transformer_case(device, dtype, quick, "gelu"), gan_case(device, dtype, quick)]
    return out
