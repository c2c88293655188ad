"""Triton kernels and their launch configs (installed as bigmodel.kernels). Nothing here knows
about autograd or modules. attention.py, linear_relu.py and _hopper.py import triton, so import
them only where used; _common.py imports neither triton nor anything heavy."""
