"""Triton kernels and their launch configs (installed as bigmodel.kernels). Nothing here knows
about autograd or modules; each module imports triton, so import them only where used."""
