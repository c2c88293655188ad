"""The static rules of bench/sm90.py reject what they are meant to (planted facts), and the
pieces they rest on (ptxas log parsing, occupancy) read what the compiler reports."""
import pytest

from bench import aot, sm90

GOOD = dict(regs=168, stack=0, spill_stores=0, spill_loads=0, arch="sm_90a", shared=160 * 1024, threads=256,
            wgmma=24, mma_sync=0, tma=10, hgmma=24, hmma=0, utma=10, ctas_per_sm=1)


def _result(facts=None, static=True, dtype="bf16", tma=True, ws=False, warps=8, **extra):
    job = dict(kernel="k", label="planted", num_warps=warps, num_stages=2, static=static, dtype=dtype,
               needs=dict(TMA=tma, WS=ws), constexprs={})
    return dict(job=job, facts=dict(GOOD, **(facts or {})), triton="x", **extra)


def test_clean_facts_pass():
    assert sm90.violations([_result()]) == []


@pytest.mark.parametrize("planted, words", [
    (dict(spill_stores=4), "spills"),
    (dict(spill_loads=8), "spills"),
    (dict(mma_sync=4, hmma=4), "not wgmma"),
    (dict(wgmma=0, hgmma=0), "not wgmma"),
    (dict(shared=228 * 1024), "shared memory"),
    (dict(tma=0, utma=0), "without TMA"),
])
def test_planted_violations_are_caught(planted, words):
    found = sm90.violations([_result(planted)])
    assert len(found) == 1 and words in found[0], found


def test_rules_scope():
    # spills and FMA dots outside the static set (fp32, head dim 256) are reported elsewhere, not failed
    assert sm90.violations([_result(dict(spill_stores=4), static=False)]) == []
    assert sm90.violations([_result(dict(mma_sync=4, hmma=4, wgmma=0, hgmma=0), dtype="fp32")]) == []
    # a warp-specialised config that the compiler left as num_warps warps
    found = sm90.violations([_result(dict(threads=128), ws=True, warps=4)])
    assert len(found) == 1 and "warp specialisation" in found[0]
    assert sm90.violations([_result(dict(threads=384), ws=True, warps=4)]) == []
    # compile errors always fail; configs this Triton cannot build are skipped, not failed
    assert sm90.violations([dict(job=_result()["job"], error="boom", triton="x")])
    assert sm90.violations([dict(job=_result()["job"], skipped="needs x", triton="x")]) == []


def test_parse_ptxas():
    log = ("ptxas info    : Compiling entry function 'k' for 'sm_90a'\n"
           "ptxas info    : Function properties for k\n"
           "    336 bytes stack frame, 436 bytes spill stores, 424 bytes spill loads\n"
           "ptxas info    : Used 255 registers, used 1 barriers, 336 bytes cumulative stack size\n")
    assert aot.parse_ptxas(log) == dict(regs=255, stack=336, spill_stores=436, spill_loads=424)
    with pytest.raises(RuntimeError):
        aot.parse_ptxas("nothing here")


def test_ctas_per_sm():
    assert aot.ctas_per_sm(255, 256, 128 * 1024) == 1  # registers: 256 x 256 = the whole file
    assert aot.ctas_per_sm(128, 128, 32 * 1024) == 4  # 16 K registers each
    assert aot.ctas_per_sm(64, 128, 100 * 1024) == 2  # shared memory: 2 x (100 + 1) KB
    assert aot.ctas_per_sm(32, 1024, 0) == 2  # threads: 2048 per SM
    assert aot.ctas_per_sm(168, 384, 192 * 1024) == 1


def test_table_marks_disagreements():
    a, b = _result(), _result(dict(regs=170))
    for r in (a, b):
        r["job"].update(op="attention", part="fwd", head_dim=128, constexprs=dict(BLOCK_M=128, BLOCK_N=64, TMA=True))
    _, body = sm90.table({"3.6": [a], "venv": [b]})
    assert "| 168 / 170 |" in body and "| 0/0 |" in body


def test_configs_needing_a_missing_feature_are_skipped(monkeypatch):
    """On a Triton without warp specialisation (or descriptors) the autotuners never see the
    configs that need it, and say so in _hopper.SKIPPED."""
    from bigmodel.kernels import _hopper
    from bigmodel.kernels import attention as A

    monkeypatch.setattr(_hopper, "HAS_WARP_SPECIALIZE", False)
    monkeypatch.setattr(_hopper, "SKIPPED", [])
    kept = _hopper.supported("fwd", A.sm90_configs("fwd"))
    assert kept and not any(c.kwargs["WS"] for c in kept) and any(c.kwargs["TMA"] for c in kept)
    assert _hopper.SKIPPED and all("warp_specialize" in why for _, _, why in _hopper.SKIPPED)
    monkeypatch.setattr(_hopper, "HAS_TENSOR_DESCRIPTORS", False)
    assert not any(c.kwargs["TMA"] for c in _hopper.supported("fwd", A.sm90_configs("fwd")))
    assert _hopper.missing_features(tma=True) == ["tl.make_tensor_descriptor"]
