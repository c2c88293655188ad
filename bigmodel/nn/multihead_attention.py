"""bigmodel.nn.MultiheadAttention (placeholder until the attention issue lands)."""
import torch


class MultiheadAttention(torch.nn.MultiheadAttention):
    """Drop-in for torch.nn.MultiheadAttention (not fused yet)."""
