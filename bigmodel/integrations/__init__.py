"""Integrations with other libraries: each import is lazy, so bigmodel never needs them installed.

  register_transformers(name="bigmodel")   Hugging Face transformers' attention and mask interfaces
"""


def register_transformers(name="bigmodel"):
    """See :func:`bigmodel.integrations.transformers.register_transformers`."""
    from bigmodel.integrations.transformers import register_transformers as register

    return register(name)
