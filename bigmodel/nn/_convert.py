"""The one way bigmodel.nn's drop-ins take over an existing torch module."""
import copy


def sharing(cls, module):
    """A ``cls`` (a subclass of ``module``'s type) sharing ``module``'s parameters, buffers,
    submodules and hooks, without running any constructor."""
    new = cls.__new__(cls)
    new.__dict__.update(module.__dict__)
    # Fresh containers holding the same objects, so later edits to one module do not leak into the other.
    for name, value in module.__dict__.items():
        if isinstance(value, (dict, set)):
            new.__dict__[name] = copy.copy(value)
    return new
