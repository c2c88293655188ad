"""Plain-PyTorch references: what the tests trust.

They compute in whatever dtype they are given (the tests give float64) and spell out
bigmodel's semantics where torch leaves them open.
"""
import math

import torch
import torch.nn.functional as F


def ref_linear_relu(input, weight, bias=None):
    """relu(input @ weight.T + bias); NaN stays NaN (torch.relu propagates it)."""
    return torch.relu(F.linear(input, weight, bias))


def ref_activation(z, activation, negative_slope=0.01, approximate="none"):
    """The activation bigmodel.fused_linear applies: torch's own function of that name (with
    GELU(+inf) = +inf in every dtype)."""
    if activation is None:
        return z
    if activation == "relu":
        return torch.relu(z)
    if activation == "leaky_relu":
        return F.leaky_relu(z, negative_slope)
    if activation == "gelu":
        # GELU(+inf) = +inf, as torch gives it in float64 and fp16 (its fp32/bf16 kernels say NaN).
        return torch.where(z == math.inf, z, F.gelu(z, approximate=approximate))
    if activation == "silu":
        return F.silu(z)
    if activation == "tanh":
        return torch.tanh(z)
    if activation == "sigmoid":
        return torch.sigmoid(z)
    raise ValueError(f"ref_activation: unknown activation {activation!r}")


def ref_fused_linear(input, weight, bias=None, activation="relu", negative_slope=0.01, approximate="none"):
    """activation(input @ weight.T + bias), each step torch's own (NaN and inf as torch gives them)."""
    return ref_activation(F.linear(input, weight, bias), activation, negative_slope, approximate)


def ref_attention(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None,
                  enable_gqa=False, dropout_keep=None):
    """softmax(Q K^T * scale + mask) V with torch SDPA's contract, materialising the scores.

    Semantics bigmodel holds its kernels to:
      * ``is_causal``: top-left aligned, key j is visible to query i when j <= i (tril of ones(L, S));
      * bool ``attn_mask``: True = attend; float ``attn_mask``: added to the scores;
      * a row with no visible key gives output 0 (and so gradient 0), not NaN;
      * a NaN in query row i reaches output row i; a NaN in key row j reaches the rows that
        can see key j; NaN in value follows the product P V (as torch's math path);
      * ``dropout_keep``: a bool tensor broadcastable to (..., L, S) of kept probabilities
        (kept ones are scaled by 1/(1-p)); without it, ``dropout_p`` must be 0.
    """
    if dropout_p and dropout_keep is None:
        raise ValueError("ref_attention: dropout_p > 0 needs the dropout_keep mask to be reproducible")
    L, S, E = query.size(-2), key.size(-2), query.size(-1)
    scale = 1.0 / math.sqrt(E) if scale is None else scale
    if enable_gqa and key.dim() >= 3 and key.size(-3) != query.size(-3):
        rep = query.size(-3) // key.size(-3)
        key = key.repeat_interleave(rep, dim=-3)
        value = value.repeat_interleave(rep, dim=-3)
    scores = (query @ key.transpose(-2, -1)) * scale
    visible = torch.ones(L, S, dtype=torch.bool, device=query.device)
    if is_causal:
        visible = visible.tril()
    if attn_mask is not None:
        if attn_mask.dtype == torch.bool:
            visible = visible & attn_mask
        else:
            scores = scores + attn_mask
    scores = scores.masked_fill(~visible, float("-inf"))
    row_max = scores.amax(dim=-1, keepdim=True)
    # A row whose keys are all hidden (-inf) gives 0; torch's math path would give NaN.
    empty = row_max == float("-inf")
    probs = torch.exp(scores - row_max.masked_fill(empty, 0))
    probs = probs / probs.sum(dim=-1, keepdim=True).masked_fill(empty, 1)
    if dropout_keep is not None:
        probs = probs * dropout_keep / (1.0 - dropout_p)
    return probs @ value
