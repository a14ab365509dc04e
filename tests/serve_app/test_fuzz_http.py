"""Hostile POST /events bodies, and hostile paths and query strings on every read endpoint, over real HTTP to the
running Serve app: every answer is 2xx or 4xx, never a 5xx.

The bodies are the pure layer's (tests/serve_app/test_fuzz_events.py: bytes, JSON of any shape, nesting thousands
of levels deep, huge and non-finite numbers, lone surrogates, batches around the size limit), here through the
proxy, FastAPI, the replica's handler, the durable write and the live-state shards. Each example posts a batch of
BODIES_PER_EXAMPLE bodies; EXAMPLES examples make at least 500 bodies. Derandomized, nothing stored between
runs; `make fuzz` runs them random (tests/fuzzing.py).
"""

from __future__ import annotations

import os
from collections import Counter
from pathlib import Path
from urllib.parse import quote

import pytest
import requests
from hypothesis import HealthCheck, given
from hypothesis import strategies as st

from core.storage import Storage
from tests.fuzzing import fuzz_settings
from tests.helpers import publish_toy_version, start_app, stop_app, write_config
from tests.serve_app.test_fuzz_events import BODY, MAX_EVENTS

EXAMPLES = 50
BODIES_PER_EXAMPLE = 10
MIN_BODIES = 500


def _headers() -> dict[str, str]:
    headers = {"Content-Type": "application/json"}
    token = os.environ.get("IG_EVENTS_TOKEN")
    if token:  # POST /events takes a producer's bearer token when the server has one
        headers["Authorization"] = f"Bearer {token}"
    return headers


@pytest.fixture(scope="module")
def fuzz_app(ray_session, tmp_path_factory: pytest.TempPathFactory):
    base = tmp_path_factory.mktemp("fuzz_http")
    root = base / "root"
    version = publish_toy_version(Storage(str(root)), seed=1)
    # Bodies up to the default 1 MB reach the parser (deep nesting included); the batch limit is the pure layer's.
    serve = {"min_replicas": 1, "max_replicas": 1, "num_cpus": 0.1, "max_events_per_batch": MAX_EVENTS,
             "max_body_bytes": 1_000_000}
    config = write_config(Path(base / "cfg.yaml"), root=str(root), serve=serve)
    url = start_app(config, "fuzz_http", version)
    yield url
    stop_app("fuzz_http", str(root))


def test_no_body_makes_a_5xx(fuzz_app: str) -> None:
    statuses: Counter[int] = Counter()
    session = requests.Session()

    @fuzz_settings(EXAMPLES, HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.large_base_example)
    @given(st.lists(BODY, min_size=BODIES_PER_EXAMPLE, max_size=BODIES_PER_EXAMPLE))
    def post(bodies: list[bytes]) -> None:
        for body in bodies:
            res = session.post(f"{fuzz_app}/events", data=body, headers=_headers(), timeout=60)
            statuses[res.status_code] += 1
            assert res.status_code < 500, (res.status_code, res.text[:500], body[:200])

    post()
    assert sum(statuses.values()) >= MIN_BODIES, statuses
    if os.environ.get("IG_EVENTS_TOKEN"):  # with the token, the fuzz reaches validation: some bodies are stored
        assert any(200 <= code < 300 for code in statuses), statuses
        assert any(code in (400, 413, 422) for code in statuses), statuses


READS = ["/recommend/{id}", "/interests/{id}", "/similar/{id}", "/audiences", "/admin/users/{id}/live",
         "/admin/versions/{id}/curve.png", "/admin/versions", "/admin/ingestion", "/ui"]
# Ids and values of any text: lone surrogates go out as the invalid UTF-8 bytes they encode to.
ANY_CHAR = st.one_of(st.characters(), st.characters(categories=["Cs"]))
TEXT = st.one_of(st.text(max_size=40), st.text(alphabet=ANY_CHAR, max_size=300),
                 st.sampled_from(["", " ", "..", "../state", "%00", "cat-0", "user-1", "v000001", "\ud800"]))
VALUE = st.one_of(TEXT, st.integers(min_value=-(2**70), max_value=2**70).map(str),
                  st.sampled_from(["1", "0", "-1", "true", "false", "nan", "inf", "1e309"]))
PARAMS = st.dictionaries(st.sampled_from(["k", "top", "category", "brand", "explain", "exclude_seen"]), VALUE,
                         max_size=4)
READS_EXAMPLES = 300


def _encode(text: str) -> str:
    return quote(text.encode("utf-8", "surrogatepass"), safe="")


def test_no_path_or_query_on_a_read_endpoint_makes_a_5xx(fuzz_app: str) -> None:
    statuses: Counter[int] = Counter()
    session = requests.Session()
    admin = {"Authorization": f"Bearer {os.environ.get('IG_ADMIN_TOKEN', '')}"}

    @fuzz_settings(READS_EXAMPLES, HealthCheck.too_slow)
    @given(st.sampled_from(READS), TEXT, PARAMS, st.booleans())
    def read(route: str, ident: str, params: dict[str, str], with_token: bool) -> None:
        path = route.replace("{id}", _encode(ident))
        query = "&".join(f"{k}={_encode(v)}" for k, v in params.items())
        res = session.get(f"{fuzz_app}{path}?{query}", headers=admin if with_token else {}, timeout=60)
        statuses[res.status_code] += 1
        assert res.status_code < 500, (res.status_code, res.text[:500], path, query)

    read()
    assert sum(statuses.values()) >= READS_EXAMPLES, statuses
    assert any(200 <= code < 300 for code in statuses) and any(400 <= code < 500 for code in statuses), statuses
