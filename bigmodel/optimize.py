"""bigmodel.optimize(model) (placeholder until the drop-in issue lands)."""


def optimize(model, *, inplace=False):
    """Return ``model`` with its layers swapped for bigmodel's; not implemented yet."""
    raise NotImplementedError("bigmodel.optimize is not implemented yet")
