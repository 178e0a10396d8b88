"""The nightly flows' fixtures (test_nightly_scale.py, test_nightly_lease.py): where inputs and OUT live, and the
environment of a `rayseg nightly` process. A test module that defines its own `env` keeps it."""

from __future__ import annotations

import pytest

from nightly_flows import Site


@pytest.fixture(params=["local", "s3"])
def site(request, tmp_path):
    s3 = request.getfixturevalue("s3") if request.param == "s3" else None
    return Site(tmp_path / "data", s3)


@pytest.fixture
def env(tmp_path, ray_head):
    """The environment of a nightly command here: it joins the session's `ray start --head` (see conftest)."""
    return ray_head.client_env(HOME=str(tmp_path), RAY_DEDUP_LOGS="0")
