"""bigmodel.optimize(model): swap torch layers for bigmodel's and fuse Linear + ReLU, in place of
rewriting the model.

How a Linear + ReLU pair is found: the structure tells for nn.Sequential (a Linear child followed by
an nn.ReLU child) and for nn.TransformerEncoderLayer/DecoderLayer (linear1 then a relu activation).
Any other module that owns a Linear or ReLU child has its forward traced with torch.fx, one level
deep (children are leaves), in train and in eval mode: a Linear is fused when every call of it feeds
its output only into a relu (nn.ReLU, F.relu, torch.relu, Tensor.relu, in place or not). The
module's code is never rewritten: the Linear child becomes a FusedLinearReLU sharing its Parameter
objects, and an nn.ReLU child whose every call follows a fused Linear becomes nn.Identity. A relu
that lives in code (F.relu, torch.relu) stays and runs on an output that is already >= 0, which
changes nothing (same values, same gradients) and which torch.compile fuses away. An in-place
relu that has to stay would write into the fused op's saved output, so that Linear is not fused.
Modules whose forward cannot be traced are left as they were; their children are still visited.
"""
import copy
import logging
import warnings
from collections import defaultdict
from dataclasses import dataclass, field

import torch
import torch.fx
import torch.nn.functional as F
from torch import nn

from bigmodel.nn.linear_relu import FusedLinearReLU
from bigmodel.nn.multihead_attention import MultiheadAttention

log = logging.getLogger("bigmodel")

# Functional relus fx records, and whether a call is in place (from its args/kwargs).
_RELU_FUNCTIONS = {
    F.relu: lambda node: bool(node.kwargs.get("inplace", node.args[1] if len(node.args) > 1 else False)),
    torch.relu: lambda node: False,
    torch.relu_: lambda node: True,
    F.relu_: lambda node: True,
}
_RELU_METHODS = {"relu": False, "relu_": True}


@dataclass
class OptimizeReport:
    """What :func:`optimize` changed, by qualified module name.

    Attributes:
        fused: ``nn.Linear`` layers now :class:`bigmodel.nn.FusedLinearReLU`.
        relu_removed: ``nn.ReLU`` modules now ``nn.Identity`` (every call followed a fused Linear).
        attention: ``nn.MultiheadAttention`` layers now :class:`bigmodel.nn.MultiheadAttention`.
        not_traced: ``(name, reason)`` for modules owning a Linear or ReLU whose forward torch.fx
            could not trace; they were left as they were.
    """

    fused: list = field(default_factory=list)
    relu_removed: list = field(default_factory=list)
    attention: list = field(default_factory=list)
    not_traced: list = field(default_factory=list)

    def __str__(self):
        def names(xs):
            shown = ", ".join(n or "<root>" for n in xs[:8])
            return shown + (f", ... ({len(xs)} in all)" if len(xs) > 8 else "")

        lines = [f"bigmodel.optimize: fused {len(self.fused)} Linear+ReLU, swapped {len(self.attention)} "
                 f"MultiheadAttention, removed {len(self.relu_removed)} ReLU"]
        if self.fused:
            lines.append(f"  Linear+ReLU -> FusedLinearReLU: {names(self.fused)}")
        if self.relu_removed:
            lines.append(f"  nn.ReLU -> nn.Identity: {names(self.relu_removed)}")
        if self.attention:
            lines.append(f"  MultiheadAttention -> bigmodel.nn.MultiheadAttention: {names(self.attention)}")
        for name, why in self.not_traced:
            lines.append(f"  left as is (not traceable): {name or '<root>'}: {why}")
        return "\n".join(lines)


def optimize(model, *, inplace=False):
    r"""Return ``model`` with bigmodel's fused layers in place of torch's, computing the same function.

    * every ``relu(linear(x))`` becomes one :func:`bigmodel.linear_relu` call (see the module docstring
      for how pairs are found);
    * every ``nn.MultiheadAttention``, including those inside ``nn.TransformerEncoderLayer``,
      ``nn.TransformerDecoderLayer`` and ``nn.Transformer``, becomes :class:`bigmodel.nn.MultiheadAttention`.

    Parameters are shared, not copied, with the layers they come from, so parameter names,
    ``state_dict`` keys, device and dtype are unchanged and a state_dict loads strictly in both
    directions. Modules it does not recognise are left untouched. Call it before wrapping the model
    in ``torch.compile``, ``DistributedDataParallel`` or ``fully_shard``.

    In inference (eval mode under ``torch.no_grad``), ``nn.TransformerEncoderLayer`` may take
    torch's own fused fast path before calling its attention module, as the original model does; the
    outputs are then torch's. Where no key at all is visible to a query, bigmodel's attention gives
    0 where torch gives NaN.

    Args:
        model (nn.Module): the model.
        inplace (bool): change ``model`` itself instead of a deep copy. Default: ``False``.

    Returns:
        nn.Module: the optimized model. Its ``bigmodel_report`` attribute (an :class:`OptimizeReport`)
        lists what was replaced; ``print(model.bigmodel_report)`` shows it, and it is logged at INFO
        level on the ``"bigmodel"`` logger.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"bigmodel.optimize: model must be an nn.Module, got {type(model).__name__}")
    if not inplace:
        model = copy.deepcopy(model)
    report = OptimizeReport()
    names = {}
    for name, m in model.named_modules():
        names.setdefault(id(m), name)

    if type(model) is nn.MultiheadAttention:
        model = MultiheadAttention.from_torch(model)
        report.attention.append("")
    _swap_attention(model, names, report)
    _fuse_linear_relu(model, names, report)

    model.bigmodel_report = report
    log.info("%s", report)
    return model


# -----------------------------------------------------------------------------------------------


def _references(model):
    """id(child) -> [(parent, attribute name)] for every place a module is held."""
    refs = defaultdict(list)
    for parent in model.modules():
        for name, child in parent._modules.items():
            if child is not None:
                refs[id(child)].append((parent, name))
    return refs


def _swap_attention(model, names, report):
    done = {}
    for parent in list(model.modules()):
        for name, child in list(parent._modules.items()):
            if type(child) is not nn.MultiheadAttention:
                continue
            if id(child) not in done:
                done[id(child)] = MultiheadAttention.from_torch(child)
                report.attention.append(names.get(id(child), name))
            setattr(parent, name, done[id(child)])


def _has_hooks(m):
    return bool(m._forward_hooks or m._forward_pre_hooks or m._backward_hooks
                or getattr(m, "_backward_pre_hooks", None))


class _ShallowTracer(torch.fx.Tracer):
    """Traces one module's own forward: every submodule call is a leaf call_module node."""

    def is_leaf_module(self, m, module_qualified_name):
        return True


def _trace(module):
    """The fx graphs of module.forward in train and in eval mode, or the reason it failed."""
    flags = [(m, m.training) for m in module.modules()]
    graphs = []
    try:
        for mode in (True, False):
            for m, _ in flags:
                m.training = mode
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                graphs.append(_ShallowTracer().trace(module))
    except Exception as e:  # any failure means "do not touch this module"
        return None, f"{type(e).__name__}: {str(e).splitlines()[0][:120] if str(e) else ''}"
    finally:
        for m, t in flags:
            m.training = t
    return graphs, None


def _relu_of(node, module):
    """If ``node`` is a relu call: ('module', ReLU object) / ('function', inplace); else None."""
    if node.op == "call_module":
        sub = module.get_submodule(node.target)
        return ("module", sub) if type(sub) is nn.ReLU else None
    if node.op == "call_function" and node.target in _RELU_FUNCTIONS:
        return ("function", _RELU_FUNCTIONS[node.target](node))
    if node.op == "call_method" and node.target in _RELU_METHODS:
        return ("function", _RELU_METHODS[node.target])
    return None


class _Sites:
    """Every observed call of Linear and ReLU modules, gathered over all analysed parents."""

    def __init__(self):
        self.linear = defaultdict(list)  # id(Linear) -> [relu that alone consumes it, or None]
        self.relu = defaultdict(list)    # id(ReLU) -> [the Linear object feeding it, or None]
        self.analysed = set()            # id(parent) whose calls of its children are all known

    def add_graph(self, module, graph):
        for node in graph.nodes:
            if node.op != "call_module":
                continue
            sub = module.get_submodule(node.target)
            if type(sub) is nn.Linear:
                users = list(node.users)
                relu = None
                if len(users) == 1 and users[0].args[:1] == (node,):
                    relu = _relu_of(users[0], module)
                self.linear[id(sub)].append(relu)
            elif type(sub) is nn.ReLU:
                arg = node.args[0] if node.args else None
                src = None
                if isinstance(arg, torch.fx.Node) and arg.op == "call_module":
                    src = module.get_submodule(arg.target)
                self.relu[id(sub)].append(src if type(src) is nn.Linear and len(arg.users) == 1 else None)

    def add_sequence(self, children):
        prev = None
        for i, child in enumerate(children):
            nxt = children[i + 1] if i + 1 < len(children) else None
            if type(child) is nn.Linear:
                self.linear[id(child)].append(("module", nxt) if type(nxt) is nn.ReLU else None)
            elif type(child) is nn.ReLU:
                self.relu[id(child)].append(prev if type(prev) is nn.Linear else None)
            prev = child


def _analyse(model, names, report):
    sites = _Sites()
    for module in model.modules():
        kids = [c for c in module._modules.values() if c is not None]
        if not any(type(c) in (nn.Linear, nn.ReLU) for c in kids):
            continue
        if type(module).forward is nn.Sequential.forward:
            sites.add_sequence(kids)
        elif type(module) in (nn.TransformerEncoderLayer, nn.TransformerDecoderLayer):
            # Not traceable (its fast-path checks branch on tensors), but its feed-forward block is
            # linear2(dropout(activation(linear1(x)))) and linear1 is used nowhere else.
            act = module.activation
            if act is F.relu or type(act) is nn.ReLU:
                sites.linear[id(module.linear1)].append(("module", act) if type(act) is nn.ReLU
                                                        else ("function", False))
                if type(act) is nn.ReLU:
                    sites.relu[id(act)].append(module.linear1)
            else:
                sites.linear[id(module.linear1)].append(None)
            sites.linear[id(module.linear2)].append(None)
        else:
            graphs, why = _trace(module)
            if graphs is None:
                report.not_traced.append((names.get(id(module), "?"), why))
                continue
            for g in graphs:
                sites.add_graph(module, g)
        sites.analysed.add(id(module))
    return sites


def _fuse_linear_relu(model, names, report):
    sites = _analyse(model, names, report)
    refs = _references(model)
    objects = {id(m): m for m in model.modules()}

    def held_by_analysed(m):
        return all(id(p) in sites.analysed for p, _ in refs[id(m)])

    fused = set()
    for key, calls in sites.linear.items():
        lin = objects.get(key)
        if (lin is not None and len(refs[key]) == 1 and held_by_analysed(lin) and not _has_hooks(lin)
                and calls and all(c is not None for c in calls)):
            fused.add(key)

    # Drop Linears whose relu cannot go and would run in place on the fused output; repeat, since
    # dropping a Linear can keep a ReLU module that another Linear relied on losing.
    while True:
        removable = {key for key, srcs in sites.relu.items()
                     if objects.get(key) is not None and held_by_analysed(objects[key])
                     and not _has_hooks(objects[key]) and srcs
                     and all(s is not None and id(s) in fused for s in srcs)}
        drop = set()
        for key in fused:
            for kind, what in sites.linear[key]:
                inplace = what if kind == "function" else (what.inplace and id(what) not in removable)
                if inplace:
                    drop.add(key)
        if not drop:
            break
        fused -= drop

    for key in sorted(fused, key=lambda k: names.get(k, "")):
        (parent, attr), = refs[key]
        new = FusedLinearReLU.from_linear(objects[key])
        new.training = objects[key].training
        setattr(parent, attr, new)
        report.fused.append(names.get(key, attr))
    for key in sorted(removable, key=lambda k: names.get(k, "")):
        identity = nn.Identity()
        identity.training = objects[key].training
        for parent, attr in refs[key]:
            setattr(parent, attr, identity)
        report.relu_removed.append(names.get(key, "?"))
