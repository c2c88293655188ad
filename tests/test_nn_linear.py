"""bigmodel.nn.Linear: torch.nn.Linear with its CPU GEMMs on bigmodel's engine."""
import torch
import torch.nn.functional as F
from torch import nn

import bigmodel
from bigmodel.nn.linear import ENGINE_MIN_MACS, NARROW_MAX_OUT, NARROW_MIN_MACS
from paths import intel_cpu
from tolerances import assert_grads_match, assert_matches


def engine_ops(fn):
    """Names of the bigmodel ops one call of fn runs."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        fn()
    return {e.key for e in prof.key_averages() if e.key.startswith("bigmodel::")}


def test_same_layer_as_torch_and_shares_everything():
    torch.manual_seed(0)
    lin = nn.Linear(64, 48)
    calls = []
    lin.register_forward_hook(lambda m, i, o: calls.append(o.shape))
    ours = bigmodel.nn.Linear.from_torch(lin)
    assert isinstance(ours, nn.Linear) and ours.weight is lin.weight and ours.bias is lin.bias
    assert repr(ours) == repr(lin)
    assert ours.state_dict().keys() == lin.state_dict().keys()
    ours(torch.randn(3, 64))
    assert calls == [torch.Size([3, 48])]  # hooks carried over


def test_large_cpu_calls_run_on_the_engine_small_ones_on_f_linear():
    big = bigmodel.nn.Linear(256, 256)
    x = torch.randn(ENGINE_MIN_MACS // (256 * 256) + 1, 256)
    assert "bigmodel::fused_linear" in engine_ops(lambda: big(x))
    small = bigmodel.nn.Linear(16, 8)
    assert engine_ops(lambda: small(torch.randn(8, 16))) == set()


def test_cut_off_follows_the_engines_plan():
    """8M multiply-adds on an AMD CPU at AVX512 (oneDNN from a few MFLOP), 64M elsewhere (the
    engine's plan is MKL's call there): a 128x256->256 layer (8M) is on the engine only on the
    former, a 64x256->256 one (4M) nowhere."""
    level = torch.backends.cpu.get_cpu_capability()
    assert ENGINE_MIN_MACS == (8 << 20 if level == "AVX512" and not intel_cpu() else 64 << 20)
    mid = bigmodel.nn.Linear(256, 256)
    assert ("bigmodel::fused_linear" in engine_ops(lambda: mid(torch.randn(128, 256)))) == (ENGINE_MIN_MACS <= 8 << 20)
    assert engine_ops(lambda: mid(torch.randn(64, 256))) == set()


def test_narrow_layers_run_on_the_engine_at_the_vector_levels():
    """A classifier's last layer (the seed MLP's 256 -> 10 at batch 1024) runs on the engine's
    narrow kernels at AVX2 and AVX512; at DEFAULT (no narrow kernel) and below NARROW_MIN_MACS it
    is F.linear."""
    level = torch.backends.cpu.get_cpu_capability()
    assert NARROW_MAX_OUT == (14 if level == "AVX512" else 11 if level == "AVX2" else 0)
    head = bigmodel.nn.Linear(256, 10)
    on_engine = "bigmodel::fused_linear" in engine_ops(lambda: head(torch.randn(1024, 256)))
    assert on_engine == (level in ("AVX2", "AVX512"))
    assert engine_ops(lambda: head(torch.randn(NARROW_MIN_MACS // 2560 - 1, 256))) == set()
    assert engine_ops(lambda: bigmodel.nn.Linear(256, 15)(torch.randn(1024, 256))) == set()


def test_matches_float64_reference_forward_and_backward():
    """The house rule against float64, with F.linear in the same dtype as the peer, with odd
    sizes: above the cut-off, a narrow layer (both the engine's paths) and a small one."""
    torch.manual_seed(1)
    shapes = [(2049, 255, 129), (1025, 257, 11), (301, 100, 37)]
    assert 2049 * 255 * 129 >= ENGINE_MIN_MACS and 1025 * 257 * 11 >= NARROW_MIN_MACS
    for dtype, (rows, inf, outf) in [(d, s) for d in (torch.float32, torch.float64) for s in shapes]:
        layer = bigmodel.nn.Linear(inf, outf, dtype=dtype)
        x = torch.randn(rows, inf, dtype=dtype, requires_grad=True)
        g = torch.randn(rows, outf, dtype=dtype)
        params = (x, layer.weight, layer.bias)

        def run(fn, ts):
            y = fn(*ts)
            return (y,) + torch.autograd.grad(y, ts, g.to(y.dtype))

        ours = run(lambda a, w, b: layer(a), params)
        peer = run(F.linear, [t.detach().requires_grad_() for t in params])
        ref = run(F.linear, [t.detach().double().requires_grad_() for t in params])
        assert_matches(ours[0], peer[0], ref[0], what="y")
        assert_grads_match(ours[1:], peer[1:], ref[1:], ["dx", "dw", "db"], what="Linear")


def test_compiles_fullgraph_on_both_sides_of_the_cut_off():
    for rows in (4, ENGINE_MIN_MACS // (256 * 256)):
        layer = bigmodel.nn.Linear(256, 256)
        x = torch.randn(rows, 256, requires_grad=True)
        compiled = torch.compile(layer, fullgraph=True, backend="eager")
        y = compiled(x)
        y.sum().backward()
        torch.testing.assert_close(y, layer(x))
