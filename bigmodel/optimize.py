"""bigmodel.optimize(model): swap torch layers for bigmodel's and fuse Linear + activation, in
place of rewriting the model.

The fusions are data: MODULE_RULES, FUNCTION_RULES and METHOD_RULES map each activation torch spells as a module, a function or a
Tensor method (ReLU, LeakyReLU, GELU, SiLU, Tanh, Sigmoid) to the bigmodel.fused_linear activation
it is, with how to read its arguments and whether a call is in place.

How a Linear + activation pair is found: the structure tells for nn.Sequential (a Linear child
followed by an activation child) and for nn.TransformerEncoderLayer/DecoderLayer (linear1, then
the layer's activation). Any other module that owns a Linear or an activation child has its
forward traced with torch.fx, one level deep (children are leaves), in train and in eval mode: a
Linear is fused when every call of it feeds its output only into one and the same activation. The
module's code is not edited: the Linear child becomes a FusedLinear sharing its Parameter objects,
and an activation module whose every call follows a fused Linear becomes nn.Identity (a
Transformer layer's activation function, whichever it was, the identity function). An activation that lives in code
(F.relu, torch.relu) can stay only where applying it twice changes nothing: ReLU, whose second
application runs on an output that is already >= 0 (same values, same gradients, and
torch.compile fuses it away). Any other activation in code (F.gelu, torch.tanh, Tensor.sigmoid,
...) is taken out of the instance's forward instead: where the module traces to the same graph in
train and eval mode, its forward becomes that fx graph without the call (_FusedForward; the class,
parameters and state_dict are unchanged, and the module still copies and pickles). Where it
cannot, or where an in-place ReLU would stay and write into the fused op's saved output, that
Linear is not fused, and the report says why. Modules whose forward cannot be traced are left as
they were; their children are still visited.
"""
import copy
import importlib
import logging
import types
import warnings
from collections import Counter, defaultdict
from dataclasses import dataclass, field

import torch
import torch.fx
import torch.nn.functional as F
from torch import nn

from bigmodel.nn.fused_linear import FusedLinear, FusedLinearReLU
from bigmodel.nn.linear import Linear as EngineLinear
from bigmodel.nn.multihead_attention import MultiheadAttention

log = logging.getLogger("bigmodel")


@dataclass(frozen=True)
class Activation:
    """One activation call site: which fused_linear activation it is, with its arguments."""

    name: str                # bigmodel.fused_linear's activation
    options: tuple = ()      # ((keyword, value), ...) for FusedLinear: negative_slope, approximate
    inplace: bool = False
    module: object = None    # the activation module, for module calls; None in code
    fn: object = None        # the function or method name, for calls in code

    @property
    def kind(self):
        return (self.name, self.options)

    @property
    def idempotent(self):
        """act(act(z)) == act(z): the call may stay in code after its Linear is fused."""
        return self.name == "relu"


def _arg(node, i, key, default):
    """Argument ``i`` (or keyword ``key``) of an fx call node."""
    if len(node.args) > i:
        return node.args[i]
    return node.kwargs.get(key, default)


# The fusion rules. Modules: type -> (activation, options(module), inplace(module)).
MODULE_RULES = {
    nn.ReLU: ("relu", lambda m: (), lambda m: m.inplace),
    nn.LeakyReLU: ("leaky_relu", lambda m: (("negative_slope", m.negative_slope),), lambda m: m.inplace),
    nn.GELU: ("gelu", lambda m: (("approximate", m.approximate),), lambda m: False),
    nn.SiLU: ("silu", lambda m: (), lambda m: m.inplace),
    nn.Tanh: ("tanh", lambda m: (), lambda m: False),
    nn.Sigmoid: ("sigmoid", lambda m: (), lambda m: False),
}
# Functions fx records: function -> (activation, options(node), inplace(node)).
FUNCTION_RULES = {
    F.relu: ("relu", lambda n: (), lambda n: bool(_arg(n, 1, "inplace", False))),
    torch.relu: ("relu", lambda n: (), lambda n: False),
    torch.relu_: ("relu", lambda n: (), lambda n: True),
    F.relu_: ("relu", lambda n: (), lambda n: True),
    F.leaky_relu: ("leaky_relu", lambda n: (("negative_slope", float(_arg(n, 1, "negative_slope", 0.01))),),
                   lambda n: bool(_arg(n, 2, "inplace", False))),
    F.leaky_relu_: ("leaky_relu", lambda n: (("negative_slope", float(_arg(n, 1, "negative_slope", 0.01))),),
                    lambda n: True),
    F.gelu: ("gelu", lambda n: (("approximate", _arg(n, 1, "approximate", "none")),), lambda n: False),
    torch._C._nn.gelu: ("gelu", lambda n: (("approximate", _arg(n, 1, "approximate", "none")),), lambda n: False),
    F.silu: ("silu", lambda n: (), lambda n: bool(_arg(n, 1, "inplace", False))),
    torch.tanh: ("tanh", lambda n: (), lambda n: False),
    torch.tanh_: ("tanh", lambda n: (), lambda n: True),
    F.tanh: ("tanh", lambda n: (), lambda n: False),
    torch.sigmoid: ("sigmoid", lambda n: (), lambda n: False),
    torch.sigmoid_: ("sigmoid", lambda n: (), lambda n: True),
    F.sigmoid: ("sigmoid", lambda n: (), lambda n: False),
}
# Tensor methods: name -> (activation, inplace).
METHOD_RULES = {"relu": ("relu", False), "relu_": ("relu", True), "tanh": ("tanh", False),
                "tanh_": ("tanh", True), "sigmoid": ("sigmoid", False), "sigmoid_": ("sigmoid", True)}


def activation_of_module(m):
    """The Activation an activation module is, or None."""
    rule = MODULE_RULES.get(type(m))
    if rule is None:
        return None
    name, options, inplace = rule
    return Activation(name, tuple(options(m)), bool(inplace(m)), module=m)


def _activation_of_function(fn, node=None):
    """The Activation of a call of ``fn`` in code (``node``: its fx node, for the arguments)."""
    name, options, inplace = FUNCTION_RULES[fn]
    if node is None:  # a Transformer layer's activation attribute: called with the input alone
        return Activation(name, (), False, fn=fn)
    return Activation(name, tuple(options(node)), inplace(node), fn=fn)


def _activation_of_node(node, module):
    """If ``node`` is an activation call: its Activation; else None."""
    if node.op == "call_module":
        return activation_of_module(module.get_submodule(node.target))
    if node.op == "call_function" and node.target in FUNCTION_RULES:
        return _activation_of_function(node.target, node)
    if node.op == "call_method" and node.target in METHOD_RULES:
        name, inplace = METHOD_RULES[node.target]
        return Activation(name, (), inplace, fn=node.target)
    return None


def _identity(x):
    """A Transformer layer's activation after its linear1 is fused (the activation is in linear1)."""
    return x


@dataclass
class OptimizeReport:
    """What :func:`optimize` changed, by qualified module name.

    Attributes:
        fused: ``nn.Linear`` layers now :class:`bigmodel.nn.FusedLinear` (or FusedLinearReLU).
        activations: for each fused layer, the activation now inside it ("relu", "gelu", ...).
        activations_removed: activation modules now ``nn.Identity`` (every call followed a fused
            Linear), and Transformer layers whose activation function is now the identity.
        attention: ``nn.MultiheadAttention`` layers now :class:`bigmodel.nn.MultiheadAttention`.
        linear: the remaining ``nn.Linear`` layers (no activation to fuse), now
            :class:`bigmodel.nn.Linear`: the same layer, its CPU GEMMs on bigmodel's engine.
        not_fused: ``(name, reason)`` for Linears followed by an activation that could not be fused.
        not_traced: ``(name, reason)`` for modules owning a Linear or an activation whose forward
            torch.fx could not trace; they were left as they were.
        rewritten: modules whose forward called an activation in code (F.gelu, torch.tanh, ...)
            after a fused Linear: their instance's forward is now their fx graph without it.
    """

    fused: list = field(default_factory=list)
    activations: dict = field(default_factory=dict)
    activations_removed: list = field(default_factory=list)
    attention: list = field(default_factory=list)
    linear: list = field(default_factory=list)
    not_fused: list = field(default_factory=list)
    not_traced: list = field(default_factory=list)
    rewritten: list = field(default_factory=list)

    def by_activation(self):
        """{activation: how many Linears were fused with it}."""
        return dict(Counter(self.activations[n] for n in self.fused))

    def __str__(self):
        def names(xs):
            shown = ", ".join(n or "<root>" for n in xs[:8])
            return shown + (f", ... ({len(xs)} in all)" if len(xs) > 8 else "")

        counts = ", ".join(f"{n} {act}" for act, n in sorted(self.by_activation().items()))
        lines = [f"bigmodel.optimize: fused {len(self.fused)} Linear+activation ({counts or 'none'}), swapped "
                 f"{len(self.attention)} MultiheadAttention, removed {len(self.activations_removed)} activation"]
        for act in sorted(self.by_activation()):
            lines.append(f"  Linear+{act} -> FusedLinear: {names([n for n in self.fused if self.activations[n] == act])}")
        if self.activations_removed:
            lines.append(f"  activation -> identity: {names(self.activations_removed)}")
        if self.attention:
            lines.append(f"  MultiheadAttention -> bigmodel.nn.MultiheadAttention: {names(self.attention)}")
        if self.linear:
            lines.append(f"  Linear -> bigmodel.nn.Linear (CPU engine): {names(self.linear)}")
        if self.rewritten:
            lines.append(f"  forward without the fused activation calls (fx): {names(self.rewritten)}")
        for name, why in self.not_fused:
            lines.append(f"  not fused: {name or '<root>'}: {why}")
        for name, why in self.not_traced:
            lines.append(f"  left as is (not traceable): {name or '<root>'}: {why}")
        return "\n".join(lines)


def optimize(model, *, inplace=False):
    r"""Return ``model`` with bigmodel's fused layers in place of torch's, computing the same function.

    * every ``act(linear(x))`` with ``act`` one of ReLU, LeakyReLU, GELU, SiLU, Tanh, Sigmoid (as a
      module, or, for ReLU, in code) becomes one :func:`bigmodel.fused_linear` call (see the module
      docstring for how pairs are found);
    * every ``nn.MultiheadAttention``, including those inside ``nn.TransformerEncoderLayer``,
      ``nn.TransformerDecoderLayer`` and ``nn.Transformer``, becomes :class:`bigmodel.nn.MultiheadAttention`;
    * every other ``nn.Linear`` becomes :class:`bigmodel.nn.Linear`, the same layer whose CPU GEMMs
      run on bigmodel's engine (``F.linear`` on other devices and for small layers).

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

    model = _swap_modules(model, names, nn.MultiheadAttention, MultiheadAttention.from_torch, report.attention)
    _fuse_linear_activation(model, names, report)
    # The Linears left (no activation to fuse): the same layers, their CPU GEMMs on the engine.
    model = _swap_modules(model, names, nn.Linear, EngineLinear.from_torch, report.linear)

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


def _swap_modules(model, names, torch_type, convert, swapped):
    """Every module of exactly ``torch_type`` (subclasses keep their own forward) becomes
    ``convert(module)`` wherever it is held, one new module per old one; ``swapped`` gets the
    names. Returns the model, itself converted where it is of that type."""
    if type(model) is torch_type:
        swapped.append("")
        return convert(model)
    done = {}
    for parent in list(model.modules()):
        for name, child in list(parent._modules.items()):
            if type(child) is not torch_type:
                continue
            if id(child) not in done:
                done[id(child)] = convert(child)
                swapped.append(names.get(id(child), name))
            setattr(parent, name, done[id(child)])
    return model


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


class _Sites:
    """Every observed call of Linear and activation modules, gathered over all analysed parents."""

    def __init__(self):
        self.linear = defaultdict(list)  # id(Linear) -> [the Activation that alone consumes it, or None]
        self.act = defaultdict(list)     # id(activation module) -> [the Linear object feeding it, or None]
        self.transformer = {}            # id(Linear) -> the Transformer layer whose activation follows it
        self.graphs = {}                 # id(traced parent) -> its (train, eval) fx graphs
        self.analysed = set()            # id(parent) whose calls of its children are all known

    def add_graph(self, module, graph):
        for node in graph.nodes:
            if node.op != "call_module":
                continue
            sub = module.get_submodule(node.target)
            if type(sub) is nn.Linear:
                users = list(node.users)
                act = None
                if len(users) == 1 and users[0].args[:1] == (node,):
                    act = _activation_of_node(users[0], module)
                self.linear[id(sub)].append(act)
            elif type(sub) in MODULE_RULES:
                arg = node.args[0] if node.args else None
                src = None
                if isinstance(arg, torch.fx.Node) and arg.op == "call_module":
                    src = module.get_submodule(arg.target)
                self.act[id(sub)].append(src if type(src) is nn.Linear and len(arg.users) == 1 else None)

    def add_sequence(self, children):
        prev = None
        for i, child in enumerate(children):
            nxt = children[i + 1] if i + 1 < len(children) else None
            if type(child) is nn.Linear:
                self.linear[id(child)].append(activation_of_module(nxt) if nxt is not None else None)
            elif type(child) in MODULE_RULES:
                self.act[id(child)].append(prev if type(prev) is nn.Linear else None)
            prev = child

    def add_transformer_layer(self, layer):
        # Not traceable (its fast-path checks branch on tensors), but its feed-forward block is
        # linear2(dropout(activation(linear1(x)))) and linear1 is used nowhere else.
        act = layer.activation
        found = activation_of_module(act) if isinstance(act, nn.Module) else (
            _activation_of_function(act) if act in FUNCTION_RULES else None)
        self.linear[id(layer.linear1)].append(found)
        if found is not None and found.module is not None:
            self.act[id(act)].append(layer.linear1)
        if found is not None and found.module is None:
            self.transformer[id(layer.linear1)] = layer
        self.linear[id(layer.linear2)].append(None)


def _analyse(model, names, report):
    sites = _Sites()
    for module in model.modules():
        kids = [c for c in module._modules.values() if c is not None]
        if not any(type(c) is nn.Linear or type(c) in MODULE_RULES for c in kids):
            continue
        if type(module).forward is nn.Sequential.forward:
            sites.add_sequence(kids)
        elif type(module) in (nn.TransformerEncoderLayer, nn.TransformerDecoderLayer):
            sites.add_transformer_layer(module)
        else:
            graphs, why = _trace(module)
            if graphs is None:
                report.not_traced.append((names.get(id(module), "?"), why))
                continue
            for g in graphs:
                sites.add_graph(module, g)
            sites.graphs[id(module)] = graphs
        sites.analysed.add(id(module))
    return sites


def _fuse_linear_activation(model, names, report):
    sites = _analyse(model, names, report)
    refs = _references(model)
    objects = {id(m): m for m in model.modules()}

    def held_by_analysed(m):
        return all(id(p) in sites.analysed for p, _ in refs[id(m)])

    def removable_modules(fused):
        return {key for key, srcs in sites.act.items()
                if objects.get(key) is not None and held_by_analysed(objects[key])
                and not _has_hooks(objects[key]) and srcs
                and all(s is not None and id(s) in fused for s in srcs)}

    candidates = {}
    for key, calls in sites.linear.items():
        lin = objects.get(key)
        if (lin is None or len(refs[key]) != 1 or not held_by_analysed(lin) or _has_hooks(lin)
                or not calls or any(c is None for c in calls)):
            continue
        if len({c.kind for c in calls}) != 1:
            report.not_fused.append((names.get(key, "?"), "called before different activations"))
            continue
        candidates[key] = calls

    # A Linear stays unfused where its activation would remain and apply twice (another activation
    # in code, or a module that cannot go) or would run in place on the fused output. Repeat: an
    # unfused Linear can keep an activation module that another Linear relied on losing.
    # Activations in code that cannot stay (not ReLU) are taken out of the parent's forward: its
    # fx graph without them becomes the instance's forward (see _FusedForward), where the graph
    # is the same in train and eval mode and can be written back as code.
    rewrite = {key for key, calls in candidates.items()
               if any(c.module is None and not c.idempotent for c in calls) and key not in sites.transformer
               and _rewritable(sites.graphs.get(id(refs[key][0][0])))}
    fused = set(candidates)
    while True:
        removable = removable_modules(fused)
        drop = {}
        for key in fused:
            for c in candidates[key]:
                stays = c.module is None and key not in sites.transformer and key not in rewrite or (
                    c.module is not None and id(c.module) not in removable)
                if stays and not c.idempotent:
                    drop[key] = f"{c.name} {'in code' if c.module is None else 'module used elsewhere'} " \
                                f"would apply twice (the forward could not be rewritten)"
                elif stays and c.inplace:
                    drop[key] = f"in-place {c.name} that stays would write into the fused output"
        if not drop:
            break
        fused -= set(drop)
        report.not_fused += [(names.get(k, "?"), why) for k, why in drop.items()]
    rewrite &= fused

    for key in sorted(fused, key=lambda k: names.get(k, "")):
        (parent, attr), = refs[key]
        act = candidates[key][0]
        lin = objects[key]
        new = FusedLinearReLU.from_linear(lin) if act.name == "relu" else \
            FusedLinear.from_linear(lin, act.name, **dict(act.options))
        setattr(parent, attr, new)
        name = names.get(key, attr)
        report.fused.append(name)
        report.activations[name] = act.name
        layer = sites.transformer.get(key)
        if layer is not None:
            # ReLU too, though applying it twice would be harmless: left in place it costs a
            # pass over the FFN's widest tensor forward and a threshold_backward backward (11 ms
            # of a 100 ms TransformerEncoderLayer step at DEFAULT, 2048x1024).
            layer.activation = _identity
            report.activations_removed.append(names.get(id(layer), "?") + ".activation")
    by_parent = defaultdict(set)
    for key in rewrite:
        by_parent[id(refs[key][0][0])].add(refs[key][0][1])
    for parent_id, attrs in by_parent.items():
        parent = objects[parent_id]
        parent.forward = _FusedForward.from_graph(parent, sites.graphs[parent_id][0], attrs)
        report.rewritten.append(names.get(parent_id, "?"))
    for key in sorted(removable, key=lambda k: names.get(k, "")):
        identity = nn.Identity()
        identity.training = objects[key].training
        for parent, attr in refs[key]:
            setattr(parent, attr, identity)
        report.activations_removed.append(names.get(key, "?"))


# -----------------------------------------------------------------------------------------------
# Forwards rewritten without the activation calls that moved into fused Linears.


def _rewritable(graphs):
    """Whether a traced forward can become code again: the same graph in train and eval mode."""
    if graphs is None:
        return False
    train, eval_ = (g.python_code("self").src for g in graphs)
    return train == eval_ and _portable_globals(graphs[0]) is not None


def _portable_globals(graph):
    """The generated code's globals as (kind, ...) specs that survive pickling, or None."""
    specs = {}
    for name, value in graph.python_code("self").globals.items():
        if name.startswith("__"):
            continue
        if isinstance(value, types.ModuleType):
            spec = ("module", value.__name__)
        elif value is type(None):
            spec = ("none-type",)
        elif isinstance(value, (int, float, str, type(None))):
            spec = ("value", value)
        elif getattr(value, "__module__", None) and getattr(value, "__qualname__", None):
            spec = ("attr", value.__module__, value.__qualname__)
        else:
            return None
        try:
            if _resolve(spec) is not value and spec[0] != "value":
                return None
        except (ImportError, AttributeError):
            return None
        specs[name] = spec
    return specs


def _resolve(spec):
    if spec[0] == "none-type":
        return type(None)
    if spec[0] == "module":
        return importlib.import_module(spec[1])
    if spec[0] == "value":
        return spec[1]
    obj = importlib.import_module(spec[1])
    for part in spec[2].split("."):
        obj = getattr(obj, part)
    return obj


class _FusedForward:
    """A module instance's forward generated by torch.fx from its traced graph, with the activation
    calls that follow fused Linears taken out (they now run inside the Linears). The module's class,
    parameters and state_dict are untouched; it copies (copy.deepcopy) and pickles with its module.
    """

    def __init__(self, code, specs):
        self.code, self.specs = code, specs
        scope = {name: _resolve(spec) for name, spec in specs.items()}
        exec(compile(code, "<bigmodel.optimize fused forward>", "exec"), scope)  # noqa: S102
        self._fn = scope["forward"]
        self.module = None

    @classmethod
    def from_graph(cls, module, graph, linear_attrs):
        """``module``'s ``graph`` without the activation that alone follows each Linear child named
        in ``linear_attrs``; the result is bound to ``module``."""
        graph = copy.deepcopy(graph)
        for node in list(graph.nodes):
            if node.op == "call_module" and node.target in linear_attrs:
                (act,) = node.users
                act.replace_all_uses_with(node)
                graph.erase_node(act)
        graph.lint()
        fused = cls(graph.python_code("self").src, _portable_globals(graph))
        fused.module = module
        return fused

    def __call__(self, *args, **kwargs):
        return self._fn(self.module, *args, **kwargs)

    def __reduce__(self):
        return (_FusedForward, (self.code, self.specs), {"module": self.module})

    def __setstate__(self, state):
        self.module = state["module"]
