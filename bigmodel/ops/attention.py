"""bigmodel::attention: softmax(Q K^T * scale + mask) V, its registration and its public function.

The schemas are in csrc/bigmodel.cpp, the CPU kernel in csrc/cpu/attention.cpp and autograd in
csrc/autograd/attention.cpp; this file adds the fake (meta) kernels, autocast and the CUDA
kernels (Triton, in kernels/attention.py), and :func:`scaled_dot_product_attention`, which maps the contract of
``torch.nn.functional.scaled_dot_product_attention`` onto the 4-D ``(B, H, L, E)`` op.
"""
import math

import torch

from bigmodel import backend
from bigmodel.kernels._common import CPU_DTYPES
from bigmodel.ops import _registry
from bigmodel.reference import ref_attention

_NAME = "attention"
_WHERE = "bigmodel.scaled_dot_product_attention"


def _triton():
    # Imported on first use: importing bigmodel must not need triton (CPU-only installs).
    from bigmodel.kernels import attention as kernels

    return kernels


# ---------------------------------------------------------------------------------------------
# Validation and the mapping of SDPA's (..., L, E) inputs onto the 4-D op.


def _check(query, key, value, attn_mask, dropout_p, is_causal, scale):
    """The errors torch's SDPA gives (and a few it leaves to the kernels), naming the shapes."""
    for name, t in (("query", query), ("key", key), ("value", value), ("attn_mask", attn_mask)):
        if not isinstance(t, torch.Tensor) and not (name == "attn_mask" and t is None):
            raise TypeError(f"{_WHERE}: {name} must be a Tensor, got {type(t).__name__}")
    for name, t in (("query", query), ("key", key), ("value", value)):
        if t.dim() < 2:
            raise ValueError(f"{_WHERE}: {name} must have at least 2 dimensions (..., L, E), got shape "
                             f"{tuple(t.shape)}")
    shapes = f"query {tuple(query.shape)}, key {tuple(key.shape)}, value {tuple(value.shape)}"
    if query.shape[-1] != key.shape[-1]:
        raise ValueError(f"{_WHERE}: query and key must have the same embedding size (last dim); got {shapes}")
    if key.shape[-2] != value.shape[-2]:
        raise ValueError(f"{_WHERE}: key and value must have the same sequence length (dim -2); got {shapes}")
    for name, t in (("key", key), ("value", value), ("attn_mask", attn_mask)):
        if t is not None and t.device != query.device:
            raise ValueError(f"{_WHERE}: {name} is on {t.device} but query is on {query.device}")
    if not query.is_floating_point():
        raise TypeError(f"{_WHERE}: expected floating point inputs, got query of dtype {query.dtype}")
    # Under autocast the registered autocast kernel casts every floating input to one dtype.
    cast = _registry.autocast_dtype(query.device)
    for name, t in (("key", key), ("value", value)):
        if t.dtype != query.dtype and not (cast is not None and t.is_floating_point()):
            raise TypeError(f"{_WHERE}: query, key and value must have the same dtype; got query "
                            f"{query.dtype} and {name} {t.dtype}")
    dtype = cast or query.dtype
    if dtype not in CPU_DTYPES or (dtype == torch.float64 and query.device.type == "cuda"):
        raise TypeError(f"{_WHERE}: dtype {dtype} is not supported on {query.device.type}")
    if attn_mask is not None:
        if attn_mask.dtype not in (torch.bool, torch.float32, query.dtype) and not (
                cast is not None and attn_mask.is_floating_point()):
            raise TypeError(f"{_WHERE}: attn_mask must be bool (True = attend) or a float mask of the query's "
                            f"dtype {query.dtype}; got {attn_mask.dtype} (float32 is accepted too, as in torch)")
        if is_causal:
            raise ValueError(f"{_WHERE}: give either attn_mask or is_causal=True, not both (as torch)")
    if isinstance(dropout_p, bool) or not isinstance(dropout_p, (int, float)):
        raise TypeError(f"{_WHERE}: dropout_p must be a float, got {type(dropout_p).__name__}")
    if not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"{_WHERE}: dropout_p must be in [0, 1), got {dropout_p}")
    if scale is not None and (isinstance(scale, bool) or not isinstance(scale, (int, float))):
        raise TypeError(f"{_WHERE}: scale must be a float or None, got {type(scale).__name__}")


def _layout(query, key, value, attn_mask, enable_gqa):
    """Views of the inputs as 4-D (B, H, L, E) tensors plus the output's leading shape.

    Leading dims broadcast as in torch's math path (by .expand, so zero strides, no copies);
    the head dim (-3) of key/value either equals the query's, broadcasts from 1, or, with
    enable_gqa, divides it. Returns (q4, k4, v4, mask4, lead) with lead = the output's shape
    without (L, Ev).
    """
    nd = max(query.dim(), key.dim(), value.dim(), 3)

    def pad(t):
        return t.reshape((1,) * (nd - t.dim()) + tuple(t.shape))

    q, k, v = pad(query), pad(key), pad(value)
    shapes = f"query {tuple(query.shape)}, key {tuple(key.shape)}, value {tuple(value.shape)}"
    try:
        batch = torch.broadcast_shapes(q.shape[:-3], k.shape[:-3], v.shape[:-3])
    except RuntimeError:
        raise ValueError(f"{_WHERE}: the batch dims of query, key and value do not broadcast; got {shapes}") from None
    hq, hk, hv = q.shape[-3], k.shape[-3], v.shape[-3]
    if hk != hv:
        raise ValueError(f"{_WHERE}: key and value must have the same number of heads (dim -3); got {shapes}")
    if enable_gqa and hk != hq:
        if hk == 0 or hq % hk != 0:
            raise ValueError(f"{_WHERE}: with enable_gqa=True the query heads ({hq}) must be a multiple of "
                             f"the key/value heads ({hk}); got {shapes}")
        h, hkv = hq, hk
    elif hk == hq or hk == 1:
        h = hkv = hq
    else:
        raise ValueError(f"{_WHERE}: query has {hq} heads (dim -3) but key and value have {hk}; pass "
                         f"enable_gqa=True for grouped-query attention; got {shapes}")
    L, S, E, Ev = q.shape[-2], k.shape[-2], q.shape[-1], v.shape[-1]
    # expand is free (zero strides); reshape stays a view unless the strides cannot merge.
    nb = math.prod(batch)
    q4 = q.expand(*batch, h, L, E).reshape(nb, h, L, E)
    k4 = k.expand(*batch, hkv, S, E).reshape(nb, hkv, S, E)
    v4 = v.expand(*batch, hkv, S, Ev).reshape(nb, hkv, S, Ev)
    mask4 = None
    if attn_mask is not None:
        try:
            mask4 = attn_mask.expand(*batch, h, L, S)
        except RuntimeError:
            raise ValueError(f"{_WHERE}: attn_mask of shape {tuple(attn_mask.shape)} does not broadcast to "
                             f"the attention weights' shape {(*batch, h, L, S)}") from None
        mask4 = mask4.reshape(nb, h, L, S)
    lead = (*batch, h) if max(query.dim(), key.dim(), value.dim()) >= 3 else ()
    return q4, k4, v4, mask4, lead


def _draw_rng_seed(dropout_p):
    """(seed, offset) for the kernels' Philox streams, drawn from torch's default generator so that
    torch.manual_seed reproduces a dropout mask. Both stay above 2**32 so Triton always sees an
    int64 argument (no respecialisation), and the offset leaves room for B*H*L*S counters."""
    if not dropout_p:
        return None
    return torch.randint(2**32, 2**48, (2,), dtype=torch.int64)


# ---------------------------------------------------------------------------------------------
# The backends.


def _reference(q, k, v, mask, dropout_p, is_causal, scale):
    keep = None
    if dropout_p:
        keep = torch.rand(q.shape[0], q.shape[1], q.shape[2], k.shape[2], device=q.device) >= dropout_p
    return ref_attention(q, k, v, mask, dropout_p, is_causal, scale, enable_gqa=True, dropout_keep=keep)


def _attention_4d(q, k, v, mask, dropout_p, is_causal, scale):
    if backend.resolve(q, _WHERE, _registry.triton_on_cpu()) == "reference":
        return _reference(q, k, v, mask, dropout_p, is_causal, scale)
    _registry.require_ops()
    rng_seed = _draw_rng_seed(dropout_p)
    return torch.ops.bigmodel.attention(q, k, v, mask, dropout_p, is_causal, scale, rng_seed)[0]


def scaled_dot_product_attention(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False,
                                 scale=None, enable_gqa=False):
    r"""scaled_dot_product_attention(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False) -> Tensor

    Computes :math:`\mathrm{softmax}(Q K^T \cdot \mathrm{scale} + \mathrm{mask})\, V` without
    materialising the attention weights: the contract of
    :func:`torch.nn.functional.scaled_dot_product_attention`.

    Args:
        query (Tensor): ``(N, ..., Hq, L, E)``; any number of leading dims, any strides (a
            ``(B, L, H, E)`` tensor transposed to ``(B, H, L, E)`` is read in place).
        key (Tensor): ``(N, ..., H, S, E)``.
        value (Tensor): ``(N, ..., H, S, Ev)``; ``Ev`` may differ from ``E``. Head dims up to 256.
        attn_mask (Tensor, optional): broadcastable to ``(N, ..., Hq, L, S)``; bool (True = take
            part in attention) or a float mask (float32 or the query's dtype) added to the scores.
        dropout_p (float): dropout probability in ``[0, 1)``, applied whenever it is > 0 (this is
            a function: it does not know about ``module.training``). Reproducible under
            :func:`torch.manual_seed`.
        is_causal (bool): top-left aligned causal mask (key ``j`` visible to query ``i`` iff
            ``j <= i``). An error together with ``attn_mask``.
        scale (float, optional): defaults to :math:`1/\sqrt{E}`.
        enable_gqa (bool): allow ``Hq`` to be a multiple of ``H`` (grouped-query attention; K/V
            are never repeated in memory).

    Returns:
        Tensor of shape ``(N, ..., Hq, L, Ev)``. A query row that sees no key gives 0 (and
        gradient 0), not NaN; a NaN in the inputs reaches exactly the outputs it enters.

    Runs on the backend in force (see :func:`bigmodel.use_backend`): the registered op
    ``torch.ops.bigmodel.attention`` (Triton for CUDA tensors, the C++ engine for CPU tensors) or
    the plain-PyTorch reference. Supports float32 (TF32 only where
    ``torch.backends.cuda.matmul.allow_tf32``), float16, bfloat16 (and float64 on CPU),
    autograd, autocast and ``torch.compile``.
    """
    _check(query, key, value, attn_mask, dropout_p, is_causal, scale)
    if (attn_mask is not None and attn_mask.is_floating_point() and attn_mask.dtype != query.dtype
            and _registry.autocast_dtype(query.device) is None):
        attn_mask = attn_mask.to(query.dtype)  # a float32 mask for a 16-bit query (before any expand)
    q4, k4, v4, mask4, lead = _layout(query, key, value, attn_mask, enable_gqa)
    if scale is None:  # (E = 0 has all-zero scores whatever the scale: avoid 1/0)
        scale = 1.0 / math.sqrt(query.shape[-1]) if query.shape[-1] else 1.0
    scale = float(scale)
    out = _attention_4d(q4, k4, v4, mask4, float(dropout_p), bool(is_causal), scale)
    return out.reshape(*lead, query.shape[-2], value.shape[-1])


# ---------------------------------------------------------------------------------------------
# Registration of the ops defined in csrc/bigmodel.cpp (only when the extension loaded).


def _fake_forward(query, key, value, attn_mask, dropout_p, is_causal, scale, rng_seed):
    B, H, L, _ = query.shape
    out = query.new_empty(B, H, L, value.shape[-1])
    lse = query.new_empty(B, H, L, dtype=torch.float32)
    return out, lse


def _fake_backward(grad_out, query, key, value, out, lse, attn_mask, dropout_p, is_causal, scale, rng_seed):
    return tuple(torch.empty_like(t, memory_format=torch.contiguous_format) for t in (query, key, value))


def _cuda_forward(query, key, value, attn_mask, dropout_p, is_causal, scale, rng_seed):
    return _triton().attention_fwd(query, key, value, attn_mask, dropout_p, is_causal, scale, rng_seed)


def _cuda_backward(grad_out, query, key, value, out, lse, attn_mask, dropout_p, is_causal, scale, rng_seed):
    return _triton().attention_bwd(grad_out, query, key, value, out, lse, attn_mask, dropout_p, is_causal,
                                   scale, rng_seed)


if _registry.has_ops():
    torch.library.register_fake("bigmodel::attention", _fake_forward)
    torch.library.register_fake("bigmodel::attention_backward", _fake_backward)
    # Autograd is registered in C++ (csrc/autograd/attention.cpp), as for every op.
    _registry.register_cuda_kernel("attention", _cuda_forward)
    _registry.register_cuda_kernel("attention_backward", _cuda_backward)
    _registry.register_autocast(_NAME)
