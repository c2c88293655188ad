"""docs/errors.md is the contract for bad input: every row names an error, and a test triggers
it. Each test file owns the rows of its API (by id prefix) and checks them with check_row; the
ownership itself is checked in tests/test_backend.py.
"""
import pathlib
import re

import pytest
import torch

from bigmodel.ops import ExtensionNotBuilt

ROOT = pathlib.Path(__file__).resolve().parent.parent
EXCEPTIONS = {"TypeError": TypeError, "ValueError": ValueError, "RuntimeError": RuntimeError,
              "AssertionError": AssertionError, "ExtensionNotBuilt": ExtensionNotBuilt}
# id prefix -> the test file that triggers those rows.
OWNERS = {"lr": "test_linear_relu.py", "flr": "test_linear_relu.py", "fl": "test_fused_linear.py",
          "sdpa": "test_attention.py",
          "mha": "test_multihead_attention.py", "backend": "test_backend.py",
          "optimize": "test_optimize.py"}


def parse(path=ROOT / "docs" / "errors.md"):
    """{id: (argument, exception name, message template)} from the tables of docs/errors.md."""
    rows = {}
    for line in path.read_text().splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) != 5 or not line.startswith("|") or cells[0] in ("id", "") or set(cells[0]) <= {"-"}:
            continue
        ident, argument, _condition, exception, message = cells
        message = re.sub(r"^`+ ?| ?`+$", "", message)
        rows[ident] = (argument, exception.split()[0], message)
    return rows


TABLE = parse()


def rows_of(*prefixes):
    """The ids of the rows whose prefix (before the first '-') is one of ``prefixes``."""
    return sorted(i for i in TABLE if i.split("-")[0] in prefixes)


def template_regex(message):
    """A regex for a message template: literal text, with each {...} standing for any value."""
    parts = re.split(r"\{[^{}]*\}", message)
    return re.compile(".+?".join(re.escape(p) for p in parts), re.DOTALL)


def check_row(ident, case, monkeypatch):
    """Triggers row ``ident`` with ``case`` = (call(monkeypatch), the argument the message must
    name or None, needs CUDA) and checks the exception's type and message against the table."""
    _argument, exception, message = TABLE[ident]
    call, named, needs_cuda = case
    if needs_cuda and not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU (run on the H200 by bench/device_check.sh)")
    with pytest.raises(Exception) as info:
        call(monkeypatch)
    err = info.value
    assert type(err) is EXCEPTIONS[exception], f"{ident}: raised {type(err).__name__}: {err}"
    assert template_regex(message).search(str(err)), f"{ident}: message {str(err)!r} does not match {message!r}"
    if named:
        assert re.search(rf"(?<![\w.]){re.escape(named)}(?!\w)", str(err)), f"{ident}: {named!r} not named in {err}"
