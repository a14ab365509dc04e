"""One Ray runtime per test session, small; real-data tests only when IG_REAL_DATA names ../shared/data.

Tiers: every test that uses a Ray runtime (the `ray_session` fixture, or a cluster or job it starts itself) is
marked `ray`. `make test-fast` runs the rest (`-m "not ray"`): the pure logic, in well under two minutes, and fails
if anything in it starts Ray. `make test` (CI, the README) runs everything.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

REAL_DATA_ENV = "IG_REAL_DATA"
# Tests see one fixed key, set before Ray starts so its workers inherit it.
os.environ.setdefault("IG_PSEUDONYM_KEY", "test-pseudonym-key")
os.environ.setdefault("IG_ADMIN_TOKEN", "test-admin-token")
os.environ.setdefault("IG_EVENTS_TOKEN", "test-events-token")
# Dummy credentials for the loopback S3 server (moto) of the object-storage tests; never a real account.
TEST_ENV = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_EC2_METADATA_DISABLED": "true"}
for _name, _value in TEST_ENV.items():
    os.environ.setdefault(_name, _value)
PASSED_TO_RAY = ("IG_PSEUDONYM_KEY", "IG_ADMIN_TOKEN", "IG_EVENTS_TOKEN", *TEST_ENV)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        if "ray_session" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.ray)
    named = os.environ.get(REAL_DATA_ENV)
    if named:
        if not Path(named, "README.md").is_file():
            raise pytest.UsageError(f"{REAL_DATA_ENV}={named!r} does not name the shared data folder")
        return
    keep, drop = [], []
    for item in items:
        (drop if item.get_closest_marker("realdata") else keep).append(item)
    if drop:
        config.hook.pytest_deselected(items=drop)
        items[:] = keep


@pytest.fixture(scope="session")
def real_data() -> Path:
    return Path(os.environ[REAL_DATA_ENV])


@pytest.fixture(scope="session")
def ray_session():
    import ray

    if not ray.is_initialized():
        from core.runtime import set_embedded_env

        set_embedded_env()  # as every embedded Ray of the app's own commands
        ray.init(num_cpus=2, object_store_memory=400 << 20, include_dashboard=False,
                 runtime_env={"env_vars": {k: os.environ[k] for k in PASSED_TO_RAY}})
        from ray.data import DataContext

        DataContext.get_current().enable_progress_bars = False
    yield ray
    ray.shutdown()


@pytest.fixture(autouse=True)
def _fast_tier_starts_no_ray(request: pytest.FixtureRequest):
    """In the fast tier a test that starts Ray is misfiled: fail it (it belongs under the `ray` marker)."""
    yield
    if "not ray" in (request.config.getoption("-m") or "") and "ray" in sys.modules:
        import ray

        if ray.is_initialized():
            ray.shutdown()
            pytest.fail("this test started Ray but is not marked `ray`")
