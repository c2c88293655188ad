"""Hugging Face transformers: bigmodel attention through AttentionInterface and AttentionMaskInterface.

    import bigmodel.integrations
    bigmodel.integrations.register_transformers()
    model = AutoModelForCausalLM.from_pretrained(..., attn_implementation="bigmodel")

The attention function follows transformers' own "sdpa" one (same arguments, same output layout)
with :func:`bigmodel.scaled_dot_product_attention` underneath; grouped-query attention runs with
``enable_gqa=True`` (keys and values are never repeated in memory), with or without a mask. The mask
function registered under the same name is transformers' sdpa mask builder (a boolean
``(B, 1, L, S)`` mask, True = attend, or None where ``is_causal`` says it all): without a mask
function registered, transformers would hand a custom attention no mask at all and a padded batch
would silently attend to its padding.
"""
import torch

from bigmodel.ops.attention import scaled_dot_product_attention


def bigmodel_attention_forward(module, query, key, value, attention_mask, dropout=0.0, scaling=None,
                               is_causal=None, position_bias=None, **kwargs):
    """transformers' attention-function signature: ``query`` (B, H, L, D), ``key``/``value``
    (B, Hkv, S, D); returns ``(attn_output (B, L, H, Dv), None)``."""
    if kwargs.get("softcap") is not None:
        raise ValueError("bigmodel attention does not support `softcap`; use attn_implementation='eager'")
    if kwargs.get("s_aux") is not None or kwargs.get("sinks") is not None:
        raise ValueError("bigmodel attention does not support attention sinks; use attn_implementation='eager'")
    L = query.shape[2]
    gqa = query.shape[1] != key.shape[1]
    is_causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
    # As transformers' sdpa: causal only when there is no mask and more than one query (a decode
    # step's single query sees every cached key).
    is_causal = bool(L > 1 and attention_mask is None and is_causal)
    if is_causal and key.shape[2] > L:
        # Prefill into an empty static cache: keys past L are never visible under the top-left mask.
        key, value = key[:, :, :L], value[:, :, :L]
        if position_bias is not None:
            position_bias = position_bias[..., :L]
    if position_bias is not None:
        attention_mask = _with_position_bias(position_bias, attention_mask, is_causal, L, key.shape[2])
        is_causal = False
    if attention_mask is not None and attention_mask.dtype != torch.bool:
        attention_mask = attention_mask.to(query.dtype)
    out = scaled_dot_product_attention(query, key, value, attn_mask=attention_mask, dropout_p=dropout,
                                       is_causal=is_causal, scale=scaling, enable_gqa=gqa)
    return out.transpose(1, 2).contiguous(), None


def _with_position_bias(bias, mask, is_causal, L, S):
    """An additive float mask: the position bias where visible, -inf elsewhere."""
    if mask is None and is_causal:
        mask = torch.ones(L, S, dtype=torch.bool, device=bias.device).tril()
    if mask is None:
        return bias
    if mask.dtype == torch.bool:
        return bias.masked_fill(~mask, float("-inf"))
    return bias + mask


def register_transformers(name="bigmodel"):
    r"""Register bigmodel attention with transformers as ``attn_implementation=name``.

    Registers :func:`bigmodel_attention_forward` with ``transformers.AttentionInterface`` and
    transformers' sdpa mask builder with ``transformers.AttentionMaskInterface`` under ``name``.
    Then ``from_pretrained(..., attn_implementation=name)``, ``from_config(config,
    attn_implementation=name)`` or ``model.set_attn_implementation(name)`` select it.

    Returns:
        str: ``name``.

    Raises:
        ImportError: transformers is not installed.
    """
    try:
        from transformers import AttentionInterface
        from transformers.masking_utils import AttentionMaskInterface, sdpa_mask
    except ImportError as e:
        raise ImportError("bigmodel.integrations.register_transformers needs the `transformers` package "
                          "(pip install transformers)") from e
    AttentionInterface.register(name, bigmodel_attention_forward)
    AttentionMaskInterface.register(name, sdpa_mask)
    return name
