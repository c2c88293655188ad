"""bigmodel.nn.MultiheadAttention: torch.nn.MultiheadAttention on bigmodel's fused attention."""
import torch
import torch.nn.functional as F

from bigmodel.nn._convert import sharing
from bigmodel.nn.linear import cpu_engine_linear as _linear
from bigmodel.ops.attention import scaled_dot_product_attention


class MultiheadAttention(torch.nn.MultiheadAttention):
    r"""Drop-in for :class:`torch.nn.MultiheadAttention` whose attention runs on
    :func:`bigmodel.scaled_dot_product_attention`.

    Same constructor, parameters, initialization, ``state_dict`` keys and forward signature as
    torch's (it subclasses it), so a state_dict loads strictly in both directions.

    * ``need_weights=False`` (what :class:`torch.nn.TransformerEncoderLayer` and
      :class:`~torch.nn.TransformerDecoderLayer` pass) projects Q, K, V, runs bigmodel's fused
      attention on strided views of the projections (no head transposes are copied), and merges
      ``key_padding_mask`` and ``attn_mask`` into one broadcastable mask: ``(N, 1, L, S)`` for a
      2-D ``attn_mask``, ``(N, H, L, S)`` for a 3-D one, ``(N, 1, 1, S)`` for padding alone, never
      larger than the ``(N * H, L, S)`` mask torch builds. Bool masks stay bool.
    * ``need_weights=True`` (torch's default) returns exactly torch's output and weights: it runs
      torch's own forward, as do nested-tensor inputs.

    Differences from torch, by design:

    * a query row that can see no key at all (every key masked by ``attn_mask`` and/or
      ``key_padding_mask``) gives output 0 before the output projection (so ``out_proj.bias``
      after it) and gradient 0, where torch gives NaN. This is
      :func:`bigmodel.scaled_dot_product_attention`'s rule (see ``bigmodel.reference.ref_attention``).
    * ``need_weights=False`` with ``batch_first=True`` returns a contiguous tensor (torch returns a
      transposed view); the values are the same.

    ``is_causal`` is, as in torch, a hint that ``attn_mask`` is the causal mask: it needs an
    ``attn_mask`` (else ``RuntimeError``, as torch), and without ``key_padding_mask`` the kernel's
    causal mode runs instead of reading the mask.

    Use :meth:`from_torch` to convert an existing module without copying its parameters.
    """

    @classmethod
    def from_torch(cls, mha):
        """A :class:`MultiheadAttention` sharing ``mha``'s parameters, buffers, submodules and hooks."""
        if not isinstance(mha, torch.nn.MultiheadAttention):
            raise TypeError(f"MultiheadAttention.from_torch: mha must be a torch.nn.MultiheadAttention, got "
                            f"{type(mha).__name__}")
        return sharing(cls, mha)

    def forward(self, query, key, value, key_padding_mask=None, need_weights=True, attn_mask=None,
                average_attn_weights=True, is_causal=False):
        if need_weights or query.is_nested or key.is_nested or value.is_nested:
            return super().forward(query, key, value, key_padding_mask=key_padding_mask,
                                   need_weights=need_weights, attn_mask=attn_mask,
                                   average_attn_weights=average_attn_weights, is_causal=is_causal)
        return self._fused_forward(query, key, value, key_padding_mask, attn_mask, is_causal)

    # -----------------------------------------------------------------------------------------

    def _check(self, query, key, value, key_padding_mask, attn_mask):
        """torch's shape checks (same exception types), naming the shapes we got."""
        where = "bigmodel.nn.MultiheadAttention"
        shapes = f"query {tuple(query.shape)}, key {tuple(key.shape)}, value {tuple(value.shape)}"
        if query.dim() not in (2, 3):
            raise AssertionError(f"{where}: query must be unbatched 2-D or batched 3-D; got {shapes}")
        if key.dim() != query.dim() or value.dim() != query.dim():
            raise AssertionError(f"{where}: key and value must have query's number of dims; got {shapes}")
        if query.shape[-1] != self.embed_dim:
            raise AssertionError(f"{where}: expected query's last dim to be embed_dim={self.embed_dim}; got {shapes}")
        if key.shape[-1] != self.kdim or value.shape[-1] != self.vdim:
            raise AssertionError(f"{where}: expected key's last dim kdim={self.kdim} and value's vdim="
                                 f"{self.vdim}; got {shapes}")
        if key.shape[:-1] != value.shape[:-1]:
            raise AssertionError(f"{where}: key and value must agree in sequence and batch dims; got {shapes}")
        if query.dim() == 3:
            bdim = 0 if self.batch_first else 1
            if key.shape[bdim] != query.shape[bdim]:
                raise AssertionError(f"{where}: query and key have different batch sizes; got {shapes}")
        for name, m in (("key_padding_mask", key_padding_mask), ("attn_mask", attn_mask)):
            if m is not None and m.dtype != torch.bool and not m.is_floating_point():
                raise AssertionError(f"{where}: only bool and floating types of {name} are supported, got {m.dtype}")
        if key_padding_mask is not None and key_padding_mask.dim() != query.dim() - 1:
            raise AssertionError(f"{where}: key_padding_mask must be {query.dim() - 1}-D for a {query.dim()}-D "
                                 f"query; got shape {tuple(key_padding_mask.shape)}")
        if attn_mask is not None and attn_mask.dim() not in (2, 3):
            raise AssertionError(f"{where}: attn_mask must be 2-D or 3-D; got shape {tuple(attn_mask.shape)}")

    def _project(self, query, key, value):
        """Q, K, V in the inputs' layout: (..., E). Self-attention uses one packed GEMM."""
        E = self.embed_dim
        w, b = self.in_proj_weight, self.in_proj_bias
        if not self._qkv_same_embed_dim:
            bq, bk, bv = (None, None, None) if b is None else b.chunk(3)
            return (_linear(query, self.q_proj_weight, bq), _linear(key, self.k_proj_weight, bk),
                    _linear(value, self.v_proj_weight, bv))
        if query is key and key is value:
            # One GEMM; q, k, v are strided views of its output (the kernel reads strides).
            return _linear(query, w, b).unflatten(-1, (3, E)).unbind(-2)
        if key is value:
            wq, wkv = w.split([E, 2 * E])
            bq, bkv = (None, None) if b is None else b.split([E, 2 * E])
            k, v = _linear(key, wkv, bkv).unflatten(-1, (2, E)).unbind(-2)
            return _linear(query, wq, bq), k, v
        wq, wk, wv = w.chunk(3)
        bq, bk, bv = (None, None, None) if b is None else b.chunk(3)
        return _linear(query, wq, bq), _linear(key, wk, bk), _linear(value, wv, bv)

    def _fused_forward(self, query, key, value, key_padding_mask, attn_mask, is_causal):
        self._check(query, key, value, key_padding_mask, attn_mask)
        if is_causal and attn_mask is None:
            raise RuntimeError(
                "Need attn_mask if specifying the is_causal hint. You may use the Transformer module "
                "method `generate_square_subsequent_mask` to create this mask."
            )
        batched = query.dim() == 3
        seq_first = batched and not self.batch_first
        q, k, v = self._project(query, key, value)
        if not batched:  # (L, E) -> (1, L, E)
            q, k, v = q.unsqueeze(0), k.unsqueeze(0), v.unsqueeze(0)
            if key_padding_mask is not None:
                key_padding_mask = key_padding_mask.unsqueeze(0)
        elif seq_first:  # (L, N, E) -> (N, L, E) views: no copy
            q, k, v = q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1)
        N, L, E = q.shape
        H, D = self.num_heads, self.head_dim

        # Extra keys torch appends after the projection: bias_k/bias_v, then a zero key/value.
        extra_k, extra_v = [], []
        if self.bias_k is not None:
            extra_k.append(self.bias_k.reshape(1, 1, E).expand(N, 1, E))
            extra_v.append(self.bias_v.reshape(1, 1, E).expand(N, 1, E))
        if self.add_zero_attn:
            extra_k.append(k.new_zeros(N, 1, E))
            extra_v.append(v.new_zeros(N, 1, E))
        if extra_k:
            k, v = torch.cat([k, *extra_k], dim=1), torch.cat([v, *extra_v], dim=1)
        n_extra = len(extra_k)
        S = k.shape[1]

        # torch: is_causal without key padding means "use the causal kernel, ignore the mask".
        if is_causal and key_padding_mask is None:
            mask = None
        else:
            is_causal = False
            mask = self._merge_masks(attn_mask, key_padding_mask, N, L, S, n_extra, q.dtype, batched)

        dropout_p = self.dropout if self.training else 0.0
        q4 = q.unflatten(-1, (H, D)).transpose(1, 2)  # (N, H, L, D) strided views
        k4 = k.unflatten(-1, (H, D)).transpose(1, 2)
        v4 = v.unflatten(-1, (H, D)).transpose(1, 2)
        out = scaled_dot_product_attention(q4, k4, v4, attn_mask=mask, dropout_p=dropout_p, is_causal=is_causal)
        # Back to the caller's layout; this reshape is the one copy before the output projection.
        if seq_first:
            out = out.permute(2, 0, 1, 3).reshape(L, N, E)
        else:
            out = out.transpose(1, 2).reshape(N, L, E)
        out = _linear(out, self.out_proj.weight, self.out_proj.bias)
        if not batched:
            out = out.squeeze(0)
        return out, None

    def _merge_masks(self, attn_mask, key_padding_mask, N, L, S, n_extra, dtype, batched):
        """One mask broadcastable to (N, H, L, S) in SDPA's convention (bool True = attend, float
        added), from torch's (bool True = masked out, float added) attn_mask and key_padding_mask."""
        H = self.num_heads
        S0 = S - n_extra
        am = kpm = None
        if attn_mask is not None:
            if attn_mask.dim() == 2:
                if tuple(attn_mask.shape) != (L, S0):
                    raise RuntimeError(f"The shape of the 2D attn_mask is {tuple(attn_mask.shape)}, but should "
                                       f"be {(L, S0)}.")
                am = attn_mask.view(1, 1, L, S0)
            else:
                want = (N * H, L, S0) if batched else (H, L, S0)
                if tuple(attn_mask.shape) != want:
                    raise RuntimeError(f"The shape of the 3D attn_mask is {tuple(attn_mask.shape)}, but should "
                                       f"be {want}.")
                am = attn_mask.view(N, H, L, S0)
        if key_padding_mask is not None:
            if tuple(key_padding_mask.shape) != (N, S0):
                raise AssertionError(f"Expected key_padding_mask of shape {(N, S0)} (batch, source length), "
                                     f"got {tuple(key_padding_mask.shape)}")
            kpm = key_padding_mask.view(N, 1, 1, S0)
        if am is None and kpm is None:
            return None
        if all(m is None or m.dtype == torch.bool for m in (am, kpm)):
            # Both bool (torch: True = masked out): keep a bool mask, True = attend.
            blocked = am if kpm is None else kpm if am is None else am | kpm
            visible = ~blocked
            if n_extra:  # the appended keys are never masked (torch pads the masks with 0)
                visible = F.pad(visible, (0, n_extra), value=True)
            return visible
        # Any float mask: additive, as torch (a bool one becomes -inf where True).
        def additive(m):
            if m is None:
                return None
            if m.dtype == torch.bool:
                return torch.zeros(m.shape, dtype=dtype, device=m.device).masked_fill_(m, float("-inf"))
            return m.to(dtype)

        am, kpm = additive(am), additive(kpm)
        merged = am if kpm is None else kpm if am is None else am + kpm
        if n_extra:
            merged = F.pad(merged, (0, n_extra), value=0.0)
        return merged
