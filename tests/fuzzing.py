"""What the fuzz tests share: hypothesis profiles and the replay of kept regression cases.

Profiles: ``CI`` set in the environment -> derandomized, no example database (the same examples
every run); otherwise fresh examples each run, with failures kept in .hypothesis/ and replayed
first. ``BIGMODEL_FUZZ=explore`` runs many more examples (for a long local session).
"""
import json
import os
import pathlib

import pytest
from hypothesis import HealthCheck, settings

_COMMON = dict(deadline=None, print_blob=True,
               suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
settings.register_profile("bigmodel-ci", derandomize=True, database=None, **_COMMON)
settings.register_profile("bigmodel-dev", **_COMMON)
settings.register_profile("bigmodel-explore", **{**_COMMON, "max_examples": 2000})


def _profile():
    if os.environ.get("BIGMODEL_FUZZ") == "explore":
        return "bigmodel-explore"
    return "bigmodel-ci" if os.environ.get("CI") else "bigmodel-dev"


def fuzz_settings(max_examples):
    """A bounded number of examples (the CI budget) on top of the profile in force."""
    parent = settings.get_profile(_profile())
    if _profile() == "bigmodel-explore":
        return settings(parent)
    return settings(parent, max_examples=max_examples)


def regression_params(name):
    """pytest params for tests/regressions/<name>.json, each entry a spec (plus its id and why)."""
    cases = json.loads((pathlib.Path(__file__).parent / "regressions" / f"{name}.json").read_text())
    return [pytest.param({k: v for k, v in entry.items() if k not in ("id", "why")}, id=entry["id"])
            for entry in cases["cases"]]
