"""bigmodel::attention (placeholder until the attention issue lands)."""


def scaled_dot_product_attention(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False,
                                 scale=None, enable_gqa=False):
    """torch's SDPA contract; not implemented yet."""
    raise NotImplementedError("bigmodel.scaled_dot_product_attention is not implemented yet")
