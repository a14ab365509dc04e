"""The Serve app over real HTTP on loopback: endpoints, refusals, hot swap under load, autoscaling."""

from __future__ import annotations

import shutil
import time
from collections import Counter
from pathlib import Path

import pyarrow as pa
import pytest
import requests

import registry
from core.storage import Storage
from datasets import idmaps
from tests.helpers import N_CATS, N_USERS, LoadThreads, publish_toy_version, start_app, stop_app, write_config

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def served(ray_session, tmp_path_factory: pytest.TempPathFactory):
    base = tmp_path_factory.mktemp("serve")
    storage = Storage(str(base / "root"))
    idmaps.extend(storage, "category", idmaps.load(storage, "category"),
                  pa.array([f"cat-{c}" for c in range(N_CATS)]), "r20260101T000000-00000000")
    first = publish_toy_version(storage, seed=1)
    config = write_config(base / "cfg.yaml", root=str(base / "root"), serve={
        "min_replicas": 1, "max_replicas": 2, "target_ongoing_requests": 1, "upscale_delay_s": 0.5,
        "downscale_delay_s": 3, "num_cpus": 0.1, "poll_interval_s": 0.2, "max_k": 30})
    url = start_app(config, "ig", first)
    yield {"url": url, "storage": storage, "first": first}
    stop_app("ig", str(base / "root"))


def test_recommend_personalised_without_seen_items(served: dict) -> None:
    r = requests.get(f"{served['url']}/recommend/user-4", params={"k": 10}, timeout=10)
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["path"] == "personalised" and len(body["items"]) == 10
    assert body["version"] == registry.latest_version(served["storage"])
    ids = [int(x["item_id"].split("-")[1]) for x in body["items"]]
    seen = {(4 % N_CATS) + N_CATS * j for j in range(3)}
    assert not set(ids) & seen
    assert sum(i % N_CATS == 4 % N_CATS for i in ids) >= 8  # the user's category dominates
    with_seen = requests.get(f"{served['url']}/recommend/user-4", params={"k": 30, "exclude_seen": "false"},
                             timeout=10).json()
    assert seen <= {int(x["item_id"].split("-")[1]) for x in with_seen["items"]}


def test_category_filter_and_similar_and_health(served: dict) -> None:
    body = requests.get(f"{served['url']}/recommend/user-1", params={"k": 5, "category": "cat-2"}, timeout=10).json()
    assert [int(x["item_id"].split("-")[1]) % N_CATS for x in body["items"]] == [2] * 5
    sim = requests.get(f"{served['url']}/similar/item-5", params={"k": 5}, timeout=10).json()
    assert "item-5" not in [x["item_id"] for x in sim["items"]]
    assert all(int(x["item_id"].split("-")[1]) % N_CATS == 5 % N_CATS for x in sim["items"])
    health = requests.get(f"{served['url']}/healthz", timeout=10).json()
    assert health["status"] == "ok" and health["version"]
    assert requests.get(f"{served['url']}/version", timeout=10).json()["version"]


def test_version_says_when_answers_for_known_users_are_precomputed(served: dict) -> None:
    deadline = time.time() + 60  # generous: a toy model's table takes milliseconds
    while not (info := requests.get(f"{served['url']}/version", timeout=10).json())["precomputed"]:
        assert time.time() < deadline, info
        time.sleep(0.2)
    assert info["scoring"] == "exact"
    assert requests.get(f"{served['url']}/recommend/user-4", params={"k": 10}, timeout=10).json()["path"] == \
        "personalised"


def test_unknown_user_gets_popular(served: dict) -> None:
    body = requests.get(f"{served['url']}/recommend/someone-new", params={"k": 4}, timeout=10).json()
    assert body["path"] == "popular" and [x["item_id"] for x in body["items"]] == [f"item-{i}" for i in range(4)]


@pytest.mark.parametrize(("path", "params", "status", "needle"), [
    ("/recommend/user-1", {"k": 0}, 400, "k must be"),
    ("/recommend/user-1", {"k": -3}, 400, "k must be"),
    ("/recommend/user-1", {"k": 31}, 400, "k must be"),
    ("/recommend/user-1", {"k": "many"}, 422, "k"),
    ("/recommend/" + "u" * 200, {}, 400, "longer than"),
    ("/recommend/%20", {}, 400, "empty"),
    ("/recommend/user-1", {"category": "cat-404"}, 404, "does not exist"),
    ("/similar/item-unknown", {}, 404, "not in model"),
    ("/similar/item-1", {"k": 0}, 400, "k must be"),
])
def test_bad_input_gets_4xx_with_a_message(served: dict, path: str, params: dict, status: int, needle: str) -> None:
    r = requests.get(served["url"] + path, params=params, timeout=10)
    assert r.status_code == status, r.text
    assert needle in r.text


def _versions_seen(url: str, n: int) -> Counter:
    return Counter(requests.get(f"{url}/version", timeout=10).json()["version"] for _ in range(n))


def test_hot_swap_under_load_and_a_corrupt_version_is_refused(served: dict) -> None:
    url, storage = served["url"], served["storage"]
    statuses: Counter = Counter()
    answered: list[str] = []

    def client(i: int) -> None:
        r = requests.get(f"{url}/recommend/user-{len(answered) % N_USERS}", params={"k": 5}, timeout=10)
        statuses[r.status_code] += 1
        if r.status_code == 200:
            answered.append(r.json()["version"])

    with LoadThreads(4, client):
        time.sleep(1.0)
        current = registry.latest_version(storage)
        new = publish_toy_version(storage, seed=2, parent=current)
        deadline = time.time() + 30  # generous: how fast a swap converges is bench.serve's figure
        while time.time() < deadline and set(_versions_seen(url, 10)) != {new}:
            time.sleep(0.1)
        assert set(_versions_seen(url, 10)) == {new}
        time.sleep(1.0)
    assert set(statuses) == {200}, statuses
    assert answered[-1] == new

    # A damaged version: copied from a good one, one byte of its user vectors changed, then made LATEST.
    versions = storage.path("checkpoints", "versions")
    bad = "v" + str(registry.version_number(new) + 1).zfill(6)
    shutil.copytree(f"{versions}/{new}", f"{versions}/{bad}")
    target = Path(f"{versions}/{bad}/embeddings/users.parquet")
    data = bytearray(target.read_bytes())
    data[len(data) // 2] ^= 0xFF
    target.write_bytes(bytes(data))
    Path(storage.path("checkpoints", "LATEST")).write_text(bad)
    time.sleep(2.0)
    r = requests.get(f"{url}/recommend/user-3", params={"k": 5}, timeout=10)
    assert r.status_code == 200 and r.json()["version"] == new
    info = requests.get(f"{url}/version", timeout=10).json()
    assert info["version"] == new and bad in info["refused"]
    Path(storage.path("checkpoints", "LATEST")).write_text(new)  # leave the registry sane for later tests


def test_autoscaling_up_under_load_and_back_down(served: dict) -> None:
    from ray import serve

    def replicas() -> int:
        status = serve.status().applications["ig"].deployments["Recommender"]
        return sum(n for state, n in status.replica_states.items() if str(state).endswith("RUNNING"))

    assert replicas() == 1

    def client(i: int) -> None:
        r = requests.get(f"{served['url']}/recommend/user-2", params={"k": 20}, timeout=10)
        assert r.status_code == 200, r.text

    with LoadThreads(8, client):
        peak, deadline = 1, time.time() + 40
        while time.time() < deadline and peak < 2:
            peak = max(peak, replicas())
            time.sleep(0.5)
    assert peak == 2
    deadline = time.time() + 60
    while time.time() < deadline and replicas() > 1:
        time.sleep(0.5)
    assert replicas() == 1


def test_a_new_replica_that_finds_latest_damaged_serves_the_previous_good_version(served: dict, tmp_path: Path
                                                                                  ) -> None:
    from ray import serve

    from serve_app.app import AppArgs, build_app
    from serve_app.live_state import kill_shards

    storage = Storage(str(tmp_path / "root"))
    good = publish_toy_version(storage, seed=1)
    Path(storage.path("checkpoints", "LATEST")).write_text("garbage, not a version\n")
    config = write_config(tmp_path / "cfg.yaml", root=str(tmp_path / "root"),
                          serve={"min_replicas": 1, "max_replicas": 1, "num_cpus": 0.1, "poll_interval_s": 0.2})
    serve.run(build_app(AppArgs(config_path=str(config))), name="fresh", route_prefix="/fresh")
    try:
        deadline = time.time() + 60  # generous: a replica's start is not what this measures
        health: dict = {}
        while time.time() < deadline and health.get("version") != good:
            try:
                health = requests.get(f"{served['url']}/fresh/healthz", timeout=5).json()
            except (requests.RequestException, ValueError):
                pass
            time.sleep(0.3)
        assert health.get("version") == good, health
        body = requests.get(f"{served['url']}/fresh/recommend/user-4", params={"k": 5}, timeout=10)
        assert body.status_code == 200 and body.json()["version"] == good
    finally:
        serve.delete("fresh")
        kill_shards(str(tmp_path / "root"), 2)
