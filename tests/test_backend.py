"""bigmodel.use_backend and BIGMODEL_BACKEND: which kernel a call reaches, the errors for a
backend that cannot run there, and the override's scope (its thread or asyncio task only)."""
import asyncio
import threading

import pytest
import torch

import bigmodel
from bigmodel import backend
from bigmodel.ops import triton_kernels_on_cpu
from bigmodel.reference import ref_attention, ref_linear_relu
from error_table import OWNERS, TABLE, check_row, rows_of

LR, SDPA = bigmodel.linear_relu, bigmodel.scaled_dot_product_attention


def _t(*shape):
    return torch.randn(*shape)


def _in(name, fn, *args):
    with bigmodel.use_backend(name):
        return fn(*args)


def _cpp_inside_the_fixture():
    with triton_kernels_on_cpu(), bigmodel.use_backend("cpp"):
        return LR(_t(3, 4), _t(5, 4))


# id -> (call(monkeypatch), the argument the message must name or None, needs CUDA)
ERROR_CASES = {
    "backend-name": (lambda mp: bigmodel.use_backend("fast").__enter__(), "backend", False),
    "backend-cublaslt": (lambda mp: _in("cublaslt", LR, _t(3, 4), _t(5, 4)), "backend", False),
    "backend-cublaslt-op": (lambda mp: _in("cublaslt", SDPA, _t(3, 4), _t(3, 4), _t(3, 4)), "backend", False),
    "backend-cpp-triton": (lambda mp: _cpp_inside_the_fixture(), "cpp", False),
    "backend-env": (lambda mp: (mp.setenv("BIGMODEL_BACKEND", "fast"), LR(_t(3, 4), _t(5, 4))),
                    "BIGMODEL_BACKEND", False),
}


def test_error_rows_are_all_covered():
    assert set(ERROR_CASES) == set(rows_of("backend"))


def test_every_error_row_has_an_owning_test_file():
    assert {i.split("-")[0] for i in TABLE} <= set(OWNERS), sorted(TABLE)


@pytest.mark.parametrize("ident", sorted(ERROR_CASES))
def test_error_row(ident, monkeypatch):
    check_row(ident, ERROR_CASES[ident], monkeypatch)


def test_env_var_and_nested_blocks(monkeypatch):
    monkeypatch.setenv("BIGMODEL_BACKEND", "reference")
    assert backend.current() == "reference"
    with bigmodel.use_backend("cpp"):
        assert backend.current() == "cpp"
        with bigmodel.use_backend("triton"):
            assert backend.current() == "triton"
        assert backend.current() == "cpp"
    assert backend.current() == "reference"


def test_missing_extension_says_how_to_build(monkeypatch):
    from bigmodel.ops import ExtensionNotBuilt, _registry

    monkeypatch.setattr(_registry, "_C", None)
    x, w = _t(2, 3), _t(4, 3)
    for call in (lambda: LR(x, w), lambda: SDPA(x, x, x)):
        with pytest.raises(ExtensionNotBuilt, match="make build"):
            call()
    with bigmodel.use_backend("reference"):  # the reference needs no extension
        LR(x, w)
        SDPA(x, x, x)


def test_the_triton_kernels_are_registered_for_the_cpu_only_inside_the_block():
    x, w = _t(5, 8), _t(3, 8)
    cpp = LR(x, w)
    with triton_kernels_on_cpu():
        with bigmodel.use_backend("triton"):
            triton = LR(x, w)
        with pytest.raises(RuntimeError, match="'cpp' backend"):
            _in("cpp", LR, x, w)
    with pytest.raises(RuntimeError, match="'triton' backend"):
        _in("triton", LR, x, w)
    torch.testing.assert_close(triton, cpp)
    assert torch.equal(LR(x, w), cpp)


def _worker(tid, calls, errors, backends=("cpp",)):
    gen = torch.Generator().manual_seed(1000 + tid)
    try:
        for i in range(calls):
            name = backends[i % len(backends)]
            m, k, n = (int(s) for s in torch.randint(1, 90, (3,), generator=gen))
            x, w, b = (torch.randn(m, k, generator=gen, dtype=torch.float64),
                       torch.randn(n, k, generator=gen, dtype=torch.float64),
                       torch.randn(n, generator=gen, dtype=torch.float64))
            L, S = (int(s) for s in torch.randint(1, 40, (2,), generator=gen))
            q, kk, v = (torch.randn(1, 2, n_, 8, generator=gen, dtype=torch.float64) for n_ in (L, S, S))
            with bigmodel.use_backend(name):
                assert backend.current() == name  # no other thread's block leaks in
                y = LR(x, w, b)
                o = SDPA(q, kk, v, is_causal=bool(i % 2))
            torch.testing.assert_close(y, ref_linear_relu(x, w, b), rtol=1e-10, atol=1e-10)
            torch.testing.assert_close(o, ref_attention(q, kk, v, is_causal=bool(i % 2)), rtol=1e-6, atol=1e-6)
    except BaseException as err:  # noqa: BLE001 - reported by the main thread
        errors.append((tid, repr(err)))


def _run_threads(n, target, **kwargs):
    errors = []
    threads = [threading.Thread(target=target, args=(t, 20, errors), kwargs=kwargs) for t in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    assert not any(t.is_alive() for t in threads), "a thread hung"
    assert not errors, errors


def test_concurrent_calls_from_threads_are_correct():
    """4 threads x 20 calls of both ops (C++ engine, shapes differ per call) while each also uses
    at::parallel_for inside: every result matches the float64 reference."""
    _run_threads(4, _worker)


def test_use_backend_is_per_thread():
    """Threads entering and leaving blocks with different backends each see only their own."""
    before = backend.current()
    _run_threads(4, _worker, backends=("cpp", "reference"))
    assert backend.current() == before


def test_another_threads_block_does_not_apply_here():
    seen, before = [], backend.current()
    entered, release = threading.Event(), threading.Event()

    def hold():
        with bigmodel.use_backend("reference"):
            entered.set()
            release.wait(30)

    t = threading.Thread(target=hold)
    t.start()
    try:
        assert entered.wait(30)
        seen.append(backend.current())
    finally:
        release.set()
        t.join(30)
    assert seen == [before]


def test_asyncio_tasks_do_not_restore_each_others_choice():
    async def task(name, ready, go):
        with bigmodel.use_backend(name):
            ready.set()
            await go.wait()
            return backend.current()

    async def main():
        ready = [asyncio.Event(), asyncio.Event()]
        go = asyncio.Event()
        tasks = [asyncio.create_task(task(n, r, go)) for n, r in zip(("reference", "cpp"), ready)]
        for r in ready:
            await r.wait()
        go.set()
        return await asyncio.gather(*tasks), backend.current()

    before = backend.current()
    (a, b), after = asyncio.run(main())
    assert (a, b, after) == ("reference", "cpp", before)


def test_use_backend_nests_reenters_and_decorates():
    """The innermost block wins and leaving it restores the outer one; one object entered twice
    (nested) unwinds in order; as a decorator each call runs under the backend."""
    before = backend.current()
    outer, inner = bigmodel.use_backend("reference"), bigmodel.use_backend("cpp")
    with outer:
        assert backend.current() == "reference"
        with inner:
            assert backend.current() == "cpp"
            with outer:
                assert backend.current() == "reference"
            assert backend.current() == "cpp"
        assert backend.current() == "reference"
    assert backend.current() == before

    @bigmodel.use_backend("reference")
    def seen():
        return backend.current()

    assert seen() == "reference" and seen() == "reference"
    assert backend.current() == before
