"""bigmodel.nn.MultiheadAttention against torch.nn.MultiheadAttention with the same weights."""
import itertools

import pytest
import torch

import bigmodel

TOL = {torch.float64: dict(atol=1e-10, rtol=1e-10), torch.float32: dict(atol=2e-5, rtol=2e-4)}


def pair(dtype=torch.float64, **kw):
    """(torch's module, ours) with identical weights; ours loads torch's state_dict strictly."""
    ref = torch.nn.MultiheadAttention(dtype=dtype, **kw)
    # Non-zero biases so that every parameter is exercised.
    with torch.no_grad():
        for p in ref.parameters():
            if p.dim() == 1 or p.shape[0] == 1:
                p.normal_()
    ours = bigmodel.nn.MultiheadAttention(dtype=dtype, **kw)
    ours.load_state_dict(ref.state_dict(), strict=True)
    return ref, ours


def inputs(N, L, S, E, kdim, vdim, batch_first, batched, dtype, kind):
    def make(n, seq, dim):
        if not batched:
            shape = (seq, dim)
        else:
            shape = (n, seq, dim) if batch_first else (seq, n, dim)
        return torch.randn(shape, dtype=dtype, requires_grad=True)

    if kind == "self":
        x = make(N, L, E)
        return x, x, x
    if kind == "kv_same":
        kv = make(N, S, kdim)
        return make(N, L, E), kv, kv
    return make(N, L, E), make(N, S, kdim), make(N, S, vdim)


def random_masks(N, H, L, S, batched, mask_kind, mask_dtype, dtype):
    """(key_padding_mask, attn_mask) in torch's convention, with no row fully masked."""
    kpm = am = None
    if mask_kind in ("kpm", "both2", "both3"):
        blocked = torch.rand(N, S) < 0.3
        blocked[:, 0] = False  # every query keeps key 0
        kpm = blocked if batched else blocked[0]
    if mask_kind in ("2d", "both2"):
        am = torch.rand(L, S) < 0.3
        am[:, 0] = False
    if mask_kind in ("3d", "both3"):
        am = torch.rand(N * H if batched else H, L, S) < 0.3
        am[..., 0] = False

    def as_dtype(m):
        if m is None or mask_dtype == torch.bool:
            return m
        return torch.zeros(m.shape, dtype=dtype).masked_fill(m, float("-inf")) + torch.randn(m.shape, dtype=dtype) * 0.5 * ~m

    return as_dtype(kpm), as_dtype(am)


def grads(out, tensors):
    g = torch.randn_like(out)
    return torch.autograd.grad(out, tensors, g, allow_unused=True), g


CASES = list(itertools.product(
    [True, False],                                   # batch_first
    ["self", "kv_same", "cross"],                    # how query/key/value relate
    [None, "kpm", "2d", "3d", "both2", "both3"],     # masks
))


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("float_masks,batch_first,kind,mask_kind",
                         [(f, *c) for f in (False, True) for c in CASES if f is False or c[2] is not None])
def test_matches_torch_forward_backward(dtype, float_masks, batch_first, kind, mask_kind):
    N, L, E, H = 3, 7, 20, 4  # head dim 5
    S = L if kind == "self" else 13
    mask_dtype = dtype if float_masks else torch.bool
    ref, ours = pair(dtype, embed_dim=E, num_heads=H, batch_first=batch_first)
    q, k, v = inputs(N, L, S, E, E, E, batch_first, True, dtype, kind)
    kpm, am = random_masks(N, H, L, S, True, mask_kind, mask_dtype, dtype)
    for mode in ("train", "eval"):
        ref.train(mode == "train"), ours.train(mode == "train")
        out_r, w_r = ref(q, k, v, key_padding_mask=kpm, attn_mask=am, need_weights=False)
        out_o, w_o = ours(q, k, v, key_padding_mask=kpm, attn_mask=am, need_weights=False)
        assert w_r is None and w_o is None and out_o.shape == out_r.shape
        torch.testing.assert_close(out_o, out_r, **TOL[dtype])
        (g_r, gy) = grads(out_r, [q, k, v] + list(ref.parameters()))
        g_o = torch.autograd.grad(out_o, [q, k, v] + list(ours.parameters()), gy, allow_unused=True)
        for a, b in zip(g_o, g_r):
            if b is None:
                assert a is None or not a.any()
            else:
                torch.testing.assert_close(a, b, **TOL[dtype])


@pytest.mark.parametrize("batched", [True, False])
@pytest.mark.parametrize("opts", [
    dict(kdim=6, vdim=11),
    dict(add_bias_kv=True),
    dict(add_zero_attn=True),
    dict(add_bias_kv=True, add_zero_attn=True, kdim=9, vdim=5),
    dict(bias=False),
])
@pytest.mark.parametrize("mask_kind", [None, "kpm", "both3"])
def test_options_match_torch(batched, opts, mask_kind):
    dtype = torch.float64
    N, L, S, E, H = 2, 5, 9, 12, 3
    kdim, vdim = opts.get("kdim", E), opts.get("vdim", E)
    ref, ours = pair(dtype, embed_dim=E, num_heads=H, batch_first=False, **opts)
    q, k, v = inputs(N, L, S, E, kdim, vdim, False, batched, dtype, "cross")
    kpm, am = random_masks(N, H, L, S, batched, mask_kind, torch.bool, dtype)
    out_r, _ = ref(q, k, v, key_padding_mask=kpm, attn_mask=am, need_weights=False)
    out_o, _ = ours(q, k, v, key_padding_mask=kpm, attn_mask=am, need_weights=False)
    torch.testing.assert_close(out_o, out_r, **TOL[dtype])
    g_r, gy = grads(out_r, [q, k, v] + list(ref.parameters()))
    g_o = torch.autograd.grad(out_o, [q, k, v] + list(ours.parameters()), gy)
    for a, b in zip(g_o, g_r):
        torch.testing.assert_close(a, b, **TOL[dtype])


@pytest.mark.parametrize("batch_first", [True, False])
@pytest.mark.parametrize("with_kpm", [False, True])
def test_is_causal_hint(batch_first, with_kpm):
    dtype = torch.float64
    N, L, E, H = 2, 6, 8, 2
    ref, ours = pair(dtype, embed_dim=E, num_heads=H, batch_first=batch_first)
    x, _, _ = inputs(N, L, L, E, E, E, batch_first, True, dtype, "self")
    causal = torch.nn.Transformer.generate_square_subsequent_mask(L, dtype=dtype)
    kpm = None
    if with_kpm:
        kpm = torch.zeros(N, L, dtype=torch.bool)
        kpm[1, -2:] = True
    out_r, _ = ref(x, x, x, attn_mask=causal, key_padding_mask=kpm, is_causal=True, need_weights=False)
    out_o, _ = ours(x, x, x, attn_mask=causal, key_padding_mask=kpm, is_causal=True, need_weights=False)
    torch.testing.assert_close(out_o, out_r, **TOL[dtype])
    # torch: the hint alone is an error; so it is for us.
    with pytest.raises(RuntimeError, match="Need attn_mask"):
        ref(x, x, x, is_causal=True, need_weights=False)
    with pytest.raises(RuntimeError, match="Need attn_mask"):
        ours(x, x, x, is_causal=True, need_weights=False)


@pytest.mark.parametrize("batch_first", [True, False])
@pytest.mark.parametrize("average", [True, False])
def test_need_weights_is_exactly_torch(batch_first, average):
    dtype = torch.float32
    ref, ours = pair(dtype, embed_dim=12, num_heads=3, batch_first=batch_first, add_bias_kv=True)
    q, k, v = inputs(2, 5, 7, 12, 12, 12, batch_first, True, dtype, "cross")
    kpm, am = random_masks(2, 3, 5, 7, True, "both2", torch.bool, dtype)
    out_r, w_r = ref(q, k, v, key_padding_mask=kpm, attn_mask=am, average_attn_weights=average)
    out_o, w_o = ours(q, k, v, key_padding_mask=kpm, attn_mask=am, average_attn_weights=average)
    assert torch.equal(out_o, out_r) and torch.equal(w_o, w_r)


def test_fully_masked_row_gives_zero_not_nan():
    dtype = torch.float64
    ref, ours = pair(dtype, embed_dim=8, num_heads=2, batch_first=True)
    x = torch.randn(2, 4, 8, dtype=dtype, requires_grad=True)
    kpm = torch.zeros(2, 4, dtype=torch.bool)
    kpm[1] = True  # batch 1 sees no key at all
    out, _ = ours(x, x, x, key_padding_mask=kpm, need_weights=False)
    assert torch.isfinite(out).all()
    # Attention output 0, so the layer output is out_proj's bias there.
    torch.testing.assert_close(out[1], ours.out_proj.bias.expand(4, 8))
    torch.testing.assert_close(out[0], ref(x[:1], x[:1], x[:1], need_weights=False)[0][0], **TOL[dtype])
    out.sum().backward()
    assert torch.isfinite(x.grad).all()


def test_dropout_only_in_training():
    dtype = torch.float64
    ref, ours = pair(dtype, embed_dim=8, num_heads=2, batch_first=True, dropout=0.5)
    x = torch.randn(2, 16, 8, dtype=dtype)
    ours.eval(), ref.eval()
    torch.testing.assert_close(ours(x, x, x, need_weights=False)[0], ref(x, x, x, need_weights=False)[0],
                               **TOL[dtype])
    ours.train()
    torch.manual_seed(0)
    a = ours(x, x, x, need_weights=False)[0]
    torch.manual_seed(0)
    b = ours(x, x, x, need_weights=False)[0]
    assert torch.equal(a, b)
    assert not torch.allclose(a, ours.eval()(x, x, x, need_weights=False)[0])


def test_state_dict_and_from_torch():
    ref = torch.nn.MultiheadAttention(10, 5, kdim=3, vdim=4, add_bias_kv=True)
    ours = bigmodel.nn.MultiheadAttention(10, 5, kdim=3, vdim=4, add_bias_kv=True)
    assert list(ours.state_dict()) == list(ref.state_dict())
    ours.load_state_dict(ref.state_dict(), strict=True)
    ref.load_state_dict(ours.state_dict(), strict=True)
    conv = bigmodel.nn.MultiheadAttention.from_torch(ref)
    assert type(conv) is bigmodel.nn.MultiheadAttention
    assert all(a is b for a, b in zip(conv.parameters(), ref.parameters()))
    assert list(dict(conv.named_parameters())) == list(dict(ref.named_parameters()))
    assert repr(conv) == repr(ref)


def test_errors_name_shapes():
    ours = bigmodel.nn.MultiheadAttention(8, 2, batch_first=True)
    x = torch.randn(2, 3, 8)
    with pytest.raises(AssertionError, match="embed_dim=8"):
        ours(torch.randn(2, 3, 6), x, x, need_weights=False)
    with pytest.raises(RuntimeError, match="2D attn_mask"):
        ours(x, x, x, attn_mask=torch.zeros(3, 4, dtype=torch.bool), need_weights=False)
    with pytest.raises(AssertionError, match="key_padding_mask"):
        ours(x, x, x, key_padding_mask=torch.zeros(2, 5, dtype=torch.bool), need_weights=False)


def test_compile_fullgraph():
    ours = bigmodel.nn.MultiheadAttention(8, 2, batch_first=True)
    x = torch.randn(2, 5, 8)
    kpm = torch.zeros(2, 5, dtype=torch.bool)
    kpm[0, -1] = True
    f = torch.compile(lambda x, m: ours(x, x, x, key_padding_mask=m, need_weights=False)[0], fullgraph=True,
                      backend="eager")
    torch.testing.assert_close(f(x, kpm), ours(x, x, x, key_padding_mask=kpm, need_weights=False)[0])


# ---------------------------------------------------------------------------------------------
# Errors (docs/errors.md).

from error_table import check_row, rows_of  # noqa: E402


def _t(*shape, **kw):
    return torch.randn(*shape, **kw)


def _mha_call(q, k, v, **kw):
    return bigmodel.nn.MultiheadAttention(8, 2)(q, k, v, need_weights=False, **kw)


X = (_t(3, 2, 8),) * 3
# id -> (call(monkeypatch), the argument the message must name or None, needs CUDA)
ERROR_CASES = {
    "mha-heads": (lambda mp: bigmodel.nn.MultiheadAttention(8, 3), "num_heads", False),
    "mha-from-torch": (lambda mp: bigmodel.nn.MultiheadAttention.from_torch(torch.nn.Linear(2, 2)), "mha", False),
    "mha-dim": (lambda mp: _mha_call(*(_t(1, 3, 2, 8),) * 3), "query", False),
    "mha-kv-dim": (lambda mp: _mha_call(_t(3, 2, 8), _t(3, 8), _t(3, 8)), "key", False),
    "mha-embed": (lambda mp: _mha_call(*(_t(3, 2, 7),) * 3), "embed_dim", False),
    "mha-kvdim": (lambda mp: _mha_call(_t(3, 2, 8), _t(3, 2, 7), _t(3, 2, 7)), "kdim", False),
    "mha-kv-shape": (lambda mp: _mha_call(_t(3, 2, 8), _t(4, 2, 8), _t(5, 2, 8)), "key", False),
    "mha-batch": (lambda mp: _mha_call(_t(3, 2, 8), _t(4, 3, 8), _t(4, 3, 8)), "key", False),
    "mha-mask-dtype": (lambda mp: _mha_call(*X, attn_mask=torch.ones(3, 3, dtype=torch.int64)), "attn_mask", False),
    "mha-kpm-dim": (lambda mp: _mha_call(*X, key_padding_mask=torch.zeros(3, dtype=torch.bool)),
                    "key_padding_mask", False),
    "mha-kpm-shape": (lambda mp: _mha_call(*X, key_padding_mask=torch.zeros(2, 5, dtype=torch.bool)),
                      "key_padding_mask", False),
    "mha-mask-dim": (lambda mp: _mha_call(*X, attn_mask=torch.zeros(1, 4, 3, 3, dtype=torch.bool)), "attn_mask", False),
    "mha-mask-2d": (lambda mp: _mha_call(*X, attn_mask=torch.zeros(3, 4, dtype=torch.bool)), "attn_mask", False),
    "mha-mask-3d": (lambda mp: _mha_call(*X, attn_mask=torch.zeros(5, 3, 3, dtype=torch.bool)), "attn_mask", False),
    "mha-causal": (lambda mp: _mha_call(*X, is_causal=True), "is_causal", False),
}


def test_error_rows_are_all_covered():
    assert set(ERROR_CASES) == set(rows_of("mha"))


@pytest.mark.parametrize("ident", sorted(ERROR_CASES))
def test_error_row(ident, monkeypatch):
    check_row(ident, ERROR_CASES[ident], monkeypatch)
