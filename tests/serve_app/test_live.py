"""Live events and deletion over real HTTP, with two replicas: folding on every replica, durability across a
restart, refusals that store nothing, and a deletion that reaches serving at once and the next version after.

This app answers through the versions' approximate index (serve.index_min_items 1; every version here carries
one), so folding, exclusions and deletion are shown on the index path; tests/serve_app/test_serve.py shows them on
exact scoring."""

from __future__ import annotations

import time
from collections import Counter
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import requests

import registry
from core.storage import Storage
from datasets import idmaps
from datasets.ingest import Request, run_ingest
from datasets.pseudonym import pseudonymise, shard_of_keys
from tests.helpers import (
    N_CATS,
    N_ITEMS,
    N_USERS,
    PRODUCER,
    TEST_KEY,
    make_config,
    publish_toy_version,
    read_dir,
    start_app,
    stop_app,
    toy_seen,
    write_config,
)

pytestmark = pytest.mark.slow
ADMIN = "test-admin-token"  # set for Ray workers by tests/conftest.py
SEED_TS = 1_767_225_600_000  # 2026-01-01: the seed log is older than anything posted live
SEAL_S = 3.0  # serve.live_seal_s here: a live file is ingested once this old (30 s by default)


def _sealed() -> None:
    """Wait until every live file written so far is sealed, so the next ingestion takes all of them."""
    time.sleep(SEAL_S + 1.5)


def _seed_log(path: Path) -> None:
    """The toy model's world as a behaviour log: every user's seen items, and every item once."""
    rows = ["user_id,item_id,event,ts,category_id"]
    for u in range(N_USERS):
        for i in toy_seen(u):
            rows.append(f"user-{u},item-{i},view,{SEED_TS + u},cat-{i % N_CATS}")
    for i in range(N_ITEMS):
        rows.append(f"seed-shopper-{i % 7},item-{i},view,{SEED_TS + 100 + i},cat-{i % N_CATS}")
    path.write_text("\n".join(rows) + "\n")


@pytest.fixture(scope="module")
def live(ray_session, tmp_path_factory: pytest.TempPathFactory):
    base = tmp_path_factory.mktemp("live")
    root = base / "root"
    _seed_log(base / "seed.csv")
    cfg = make_config(root, train={"epochs": 2, "batch_size": 64, "embedding_dim": 8, "num_layers": 1,
                                   "num_workers": 1, "holdout": "last_days", "holdout_days": 0.5},
                      serve={"live_seal_s": SEAL_S, "index_min_items": 1})
    run_ingest(cfg, Request(source=str(base / "seed.csv"), fmt="events", holdout=None))
    storage = Storage(str(root))
    assert idmaps.load(storage, "category").column("key").to_pylist() == [f"cat-{c}" for c in range(N_CATS)]
    first = publish_toy_version(storage, seed=1, watermark_ms=SEED_TS + 1000, index=True)
    serve = {"min_replicas": 2, "max_replicas": 2, "num_cpus": 0.1, "poll_interval_s": 0.2, "max_k": 30,
             "max_events_per_batch": 50, "max_body_bytes": 20_000, "live_seal_s": SEAL_S,
             "index_min_items": 1}
    config = write_config(base / "cfg.yaml", root=str(root), serve=serve)
    url = start_app(config, "live", first)
    yield {"url": url, "storage": storage, "cfg": cfg, "config": config, "first": first, "root": str(root)}
    stop_app("live", str(root))


@pytest.fixture
def toy(live: dict) -> str:
    """The toy model (known geometry, watermark before anything posted live) served on both replicas."""
    version = publish_toy_version(live["storage"], seed=1, parent=registry.latest_version(live["storage"]),
                                  watermark_ms=SEED_TS + 1000, index=True)
    _serve_version(live["url"], version)
    assert {a["scoring"] for a in _from_both_replicas(f"{live['url']}/version")} == {"index"}
    return version


def _serve_version(url: str, version: str) -> None:
    deadline = time.time() + 30
    while time.time() < deadline and {a["version"] for a in _from_both_replicas(f"{url}/version")} != {version}:
        time.sleep(0.2)
    assert {a["version"] for a in _from_both_replicas(f"{url}/version")} == {version}


def _post(url: str, **kwargs) -> requests.Response:
    """POST /events as the platform's back end does: with the producer token."""
    return requests.post(url, headers={**PRODUCER, **kwargs.pop("headers", {})}, **{"timeout": 10, **kwargs})


def _now_events(user: str, items: list[int], event: str = "purchase") -> list[dict]:
    now = int(time.time() * 1000)
    return [{"user_id": user, "item_id": f"item-{i}", "event": event, "ts": now, "category_id": f"cat-{i % N_CATS}"}
            for i in items]


def _cats(body: dict) -> Counter:
    return Counter(int(x["item_id"].split("-")[1]) % N_CATS for x in body["items"])


def _from_both_replicas(url: str) -> list[dict]:
    """Answers until both replicas have answered (Serve picks the replica, so ask until it has picked both)."""
    answers: list[dict] = []
    while len({a["replica"] for a in answers}) < 2:
        assert len(answers) < 60, "one replica never answered"
        answers.append(requests.get(url, timeout=10).json())
    return answers


def _live_files(storage: Storage) -> list[str]:
    return storage.list_files("raw", "live", suffix=".parquet")


def test_posted_events_change_a_known_users_answers_on_every_replica_at_once(live: dict, toy: str) -> None:
    url = live["url"]
    before = requests.get(f"{url}/recommend/user-4", params={"k": 5}, timeout=10).json()
    assert before["path"] == "personalised" and _cats(before).most_common(1)[0][0] == 4 % N_CATS
    posted = [2, 5, 8]  # category 2; user-4 likes category 1
    r = _post(f"{url}/events", json=_now_events("user-4", posted))
    assert r.status_code == 200, r.text
    assert r.json()["accepted"] == 3 and r.json()["applied_everywhere"]
    # Applied everywhere when the POST answers: the very next answers, from either replica, already show it (how
    # long that takes is bench.freshness's figure).
    for body in _from_both_replicas(f"{url}/recommend/user-4?k=5"):
        assert body["path"] == "personalised"
        assert _cats(body)[2] >= 3, body  # the new category now leads, whichever replica answered
        assert not {int(x["item_id"].split("-")[1]) for x in body["items"]} & set(posted)  # posted = seen


def test_a_new_user_with_three_events_gets_folded_recommendations(live: dict, toy: str) -> None:
    """Live events fold into a new shopper's vector; the items bought are seen (data.seen_events: purchases), the
    items only viewed stay candidates, and the best ones at that."""
    url, touched = live["url"], {"item-0", "item-3", "item-6"}
    for user, event in (("brand-new-viewer", "view"), ("brand-new-buyer", "purchase")):
        assert _post(f"{url}/events", json={"events": _now_events(user, [0, 3, 6], event)}).status_code == 200
        for body in _from_both_replicas(f"{url}/recommend/{user}?k=6"):
            assert body["path"] == "folded"
            assert _cats(body) == Counter({0: 6}), body
        # k=20: every item of category 0 that is not seen (the vector points at the category, not at the items)
        for body in _from_both_replicas(f"{url}/recommend/{user}?k=20"):
            shown = {x["item_id"] for x in body["items"] if int(x["item_id"].split("-")[1]) % N_CATS == 0}
            assert len(shown) == (20 if event == "view" else 17), (event, body)
            assert (touched <= shown) if event == "view" else not (touched & shown), (event, body)


def test_a_version_whose_watermark_covers_the_live_events_stops_folding_them(live: dict, toy: str) -> None:
    url, storage = live["url"], live["storage"]
    # user-10 likes category 1; their purchases in category 2 lead their answers while they are live.
    assert _post(f"{url}/events", json=_now_events("user-10", [2, 5, 8])).json()["accepted"]
    assert _post(f"{url}/events", json=_now_events("covered-newcomer", [0, 3, 6])).ok
    assert _cats(requests.get(f"{url}/recommend/user-10", params={"k": 5}, timeout=10).json())[2] >= 3
    covering = publish_toy_version(storage, seed=1, parent=registry.latest_version(storage),
                                   watermark_ms=int(time.time() * 1000) + 60_000, index=True)
    try:
        _serve_version(url, covering)
        for body in _from_both_replicas(f"{url}/recommend/user-10?k=5"):
            assert body["version"] == covering and body["path"] == "personalised"
            assert _cats(body).most_common(1)[0][0] == 10 % N_CATS  # back to what the model alone says
        for body in _from_both_replicas(f"{url}/recommend/covered-newcomer"):
            assert body["path"] == "popular"  # the toy model never learned them, and their events are covered
    finally:  # later tests post events of now: serve a version that does not cover them
        _serve_version(url, publish_toy_version(storage, seed=1, parent=covering, watermark_ms=SEED_TS + 1000,
                                                index=True))


@pytest.mark.parametrize(("body", "status", "needle"), [
    (b"{not json", 400, "not JSON"),
    (b'{"events": 3}', 422, "list of events"),
    (b"[]", 422, "no events"),
    (b'[1, 2]', 422, "not a JSON object"),
    (b"[" + b",".join([b'{"user_id": "a", "item_id": "b", "event": "view", "ts": 1767225600000}'] * 51) + b"]",
     413, "at most 50"),
    (b'[{"user_id": "' + b"x" * 30_000 + b'"}]', 413, "at most 20000"),
    (b'[{"user_id": "a", "item_id": "b", "event": "teleport", "ts": 1767225600000}]', 422, "unknown_event"),
])
def test_bad_batches_get_4xx_and_store_nothing(live: dict, body: bytes, status: int, needle: str) -> None:
    before = _live_files(live["storage"])
    r = _post(f"{live['url']}/events", data=body, headers={"content-type": "application/json"})
    assert r.status_code == status, r.text
    assert needle in r.text
    assert _live_files(live["storage"]) == before


def test_a_partly_bad_batch_stores_the_good_events_and_says_why_the_others_were_refused(live: dict) -> None:
    events = _now_events("mixed-shopper", [1, 4])
    events.insert(1, {"user_id": "mixed-shopper", "item_id": "item-9", "event": "view", "ts": "yesterday"})
    events.append({"user_id": "", "item_id": "item-9", "event": "view", "ts": 1767225600000})
    r = _post(f"{live['url']}/events", json=events)
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["accepted"] == 2
    assert [(x["index"], x["reason"]) for x in body["refused"]] == [(1, "bad_timestamp"), (3, "missing_user")]
    stored = pq.read_table(body["stored"])
    assert "user_id" not in stored.column_names  # only the pseudonym is ever written
    assert set(stored.column("user_key").to_pylist()) == {pseudonymise("mixed-shopper", TEST_KEY)}


def test_deletion_needs_the_token_acts_at_once_and_leaves_no_trace(live: dict) -> None:
    """DELETE /users needs the admin token and takes effect on every replica at once; the next ingestion purges
    the user's rows and the next version does not know them. After the next update, no file under data.root but
    the tombstone holds a deleted user's key or raw id: not the interactions, rejects, raw drops, live files, id map,
    graph, versions, audience exports or Ray Train's runs."""
    from serve_app.audience import build_audience
    from trainers.train import TrainOptions, run_train
    from trainers.update import run_update

    url, root, storage = live["url"], Path(live["root"]), live["storage"]
    assert requests.delete(f"{url}/users/user-7", timeout=10).status_code == 401
    wrong = requests.delete(f"{url}/users/user-7", headers={"Authorization": "Bearer nope"}, timeout=10)
    assert wrong.status_code == 403
    assert requests.get(f"{url}/recommend/user-7", timeout=10).json()["path"] == "personalised"
    ok = requests.delete(f"{url}/users/user-7", headers={"Authorization": f"Bearer {ADMIN}"}, timeout=10)
    assert ok.status_code == 200 and ok.json()["applied_everywhere"], ok.text
    answers = _from_both_replicas(f"{url}/recommend/user-7")
    assert {a["path"] for a in answers} == {"popular"}
    refused = _post(f"{url}/events", json=_now_events("user-7", [1]))
    assert refused.status_code == 422 and "deleted_user" in refused.text
    seven = pseudonymise("user-7", TEST_KEY)

    user, key = "forget-me-please", pseudonymise("forget-me-please", TEST_KEY)
    now_s = int(time.time()) - 3600
    drop = root / "raw" / "dropped-by-an-operator.csv"
    drop.parent.mkdir(parents=True, exist_ok=True)
    drop.write_text("user_id,item_id,event,ts,category_id\n" + "".join(
        f"{u},item-{i},view,{now_s + i},cat-{i % N_CATS}\n" for i in range(6) for u in (user, "bystander"))
        + f"{user},item-1,view,not-a-time,cat-1\n")  # a rejected row of theirs too
    assert _post(f"{url}/events", json=_now_events(user, [2, 5])).json()["accepted"] == 2
    _sealed()
    summary = run_ingest(live["cfg"], Request(source=None, fmt="events", holdout=None))
    assert summary["purged_users"] == 1 and summary["purged_rows"] == 3  # user-7's seeded rows
    assert seven not in read_dir(root / "interactions").column("user_key").to_pylist()
    published = run_train(live["cfg"], TrainOptions(num_workers=1, epochs=2))
    version = registry.load_version(storage, published["version"])
    assert key in version.user_keys and pseudonymise("user-4", TEST_KEY) in version.user_keys
    assert seven not in version.user_keys
    users = pq.read_table(storage.path("checkpoints", "versions", published["version"], "embeddings",
                                       "users.parquet"))
    assert seven not in users.column("user_key").to_pylist()
    audience = build_audience(live["cfg"], "cat-2", None, 1000)  # an export that takes everybody
    assert key in pq.read_table(audience["path"])["user_key"].to_pylist()
    assert _post(f"{url}/events", json=_now_events(user, [8])).json()["accepted"] == 1  # acknowledged, not sealed
    ok = requests.delete(f"{url}/users/{user}", headers={"Authorization": f"Bearer {ADMIN}"}, timeout=10)
    assert ok.status_code == 200
    summary = run_update(live["cfg"])
    assert summary["version"] is not None, summary
    assert key not in registry.load_latest(live["storage"]).user_keys

    found = []
    for path in root.rglob("*"):
        if not path.is_file() or "tombstones" in path.parts:
            continue
        if path.suffix == ".parquet":
            table = pq.read_table(path)
            for name in table.column_names:
                if pa.types.is_string(table.column(name).type) or pa.types.is_large_string(table.column(name).type):
                    values = [v for v in table.column(name).to_pylist() if v]
                    if any(key in v or user in v for v in values):
                        found.append(f"{path}:{name}")
        elif key.encode() in path.read_bytes() or user.encode() in path.read_bytes():
            found.append(str(path))
    assert not found, found
    assert "bystander" in drop.read_text()  # only the deleted user's rows went


def test_acknowledged_events_survive_a_restart_and_reach_the_next_ingestion(live: dict) -> None:
    """Events acknowledged before the app, its live shards and Serve itself went away are on disk, and the next
    ingestion (the first step of every update) takes them: nothing acknowledged lives only in memory."""
    from ray import serve

    from serve_app.live_state import kill_shards

    _sealed()
    run_ingest(live["cfg"], Request(source=None, fmt="events", holdout=None))  # what earlier tests posted

    r = _post(f"{live['url']}/events", json=_now_events("durable-shopper", [10, 11]))
    assert r.status_code == 200
    _sealed()
    serve.delete("live")  # the app and its live state go away entirely
    kill_shards(live["root"], 2)
    port = int(live["url"].rsplit(":", 1)[1])
    serve.shutdown()
    assert start_app(live["config"], "live", registry.latest_version(live["storage"]), port=port) == live["url"]
    summary = run_ingest(live["cfg"], Request(source=None, fmt="events", holdout=None))
    assert summary["accepted"] == 2, summary
    rows = read_dir(Path(live["root"]) / "interactions").to_pylist()
    key = pseudonymise("durable-shopper", TEST_KEY)
    assert sorted(r["item_id"] for r in rows if r["user_key"] == key) == ["item-10", "item-11"]


def test_posting_events_needs_the_producer_token(live: dict) -> None:
    events = _now_events("tokenless", [1])
    assert requests.post(f"{live['url']}/events", json=events, timeout=10).status_code == 401
    wrong = requests.post(f"{live['url']}/events", json=events, headers={"Authorization": "Bearer guess"}, timeout=10)
    assert wrong.status_code == 403 and "not valid" in wrong.text


def test_a_killed_live_shard_comes_back_with_its_acknowledged_events(live: dict, toy: str) -> None:
    import ray

    from serve_app.live_state import NAMESPACE, shard_names

    user = "shard-survivor"
    assert _post(f"{live['url']}/events", json=_now_events(user, [1, 4, 7])).json()["accepted"] == 3
    assert {b["path"] for b in _from_both_replicas(f"{live['url']}/recommend/{user}")} == {"folded"}
    shard = pseudonymise(user, TEST_KEY)
    index = int(shard_of_keys([shard], 2)[0])
    ray.kill(ray.get_actor(shard_names(live["root"], 2)[index], namespace=NAMESPACE), no_restart=False)
    # Ray restarts the shard; it rebuilds from the durable live files and the replicas resubscribe. Generous bound:
    # how fast is the fault benchmark's figure (bench.faults).
    deadline = time.time() + 60
    while time.time() < deadline:
        try:
            if {b["path"] for b in _from_both_replicas(f"{live['url']}/recommend/{user}")} == {"folded"}:
                stats = ray.get(ray.get_actor(shard_names(live["root"], 2)[index], namespace=NAMESPACE)
                                .stats.remote(), timeout=10)
                if stats["rebuilt"] >= 3:
                    break
        except (requests.RequestException, ValueError, ray.exceptions.RayError):
            pass
        time.sleep(0.5)
    answers = _from_both_replicas(f"{live['url']}/recommend/{user}?k=5")
    assert {b["path"] for b in answers} == {"folded"}, answers
    assert all(_cats(b) == Counter({1: 5}) for b in answers)  # what the three events say, as before the kill


def test_a_full_disk_answers_503_and_leaves_no_temporary_file(live: dict, tmp_path: Path) -> None:
    import subprocess

    live_dir = Path(live["root"]) / "raw" / "live"
    live_dir.mkdir(parents=True, exist_ok=True)
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(live_dir)],
                             capture_output=True, text=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs to fill (needs root): {mounted.stderr.strip()}")
    try:
        with open(live_dir / "filler", "wb", buffering=0) as f:  # fill the disk to its last block
            try:
                while True:
                    f.write(b"x" * 4096)
            except OSError:
                pass
        r = _post(f"{live['url']}/events", json=_now_events("disk-full", [1, 2]))
        assert r.status_code == 503, r.text
        assert r.headers.get("Retry-After") and "nothing was stored" in r.text
        assert [p.name for p in live_dir.rglob("*") if p.is_file()] == ["filler"]  # no part-written or temp file
        assert requests.get(f"{live['url']}/healthz", timeout=10).status_code == 200  # the replica lives on
    finally:  # lazily if a replica still holds something open there: later tests need the real folder back
        if subprocess.run(["umount", str(live_dir)], capture_output=True).returncode != 0:
            subprocess.run(["umount", "-l", str(live_dir)], capture_output=True, check=True)


def test_a_future_dated_event_does_not_stop_folding(live: dict) -> None:
    """An event dated minutes ahead (within the clock-skew allowance) is learned and moves the watermark ahead; live
    events posted now still fold, because what a version covers is decided by arrival, not by event time."""
    from trainers.train import TrainOptions, run_train

    url, root = live["url"], Path(live["root"])
    ahead_s = int(time.time()) + 240  # four minutes ahead: accepted (data.max_future_s is five)
    (root / "raw").mkdir(parents=True, exist_ok=True)
    (root / "raw" / "skewed-clock.csv").write_text(
        f"user_id,item_id,event,ts,category_id\nskewed-shopper,item-1,view,{ahead_s},cat-1\n")
    _sealed()
    assert run_ingest(live["cfg"], Request(source=None, fmt="events", holdout=None))["watermark_ms"] >= ahead_s * 1000
    version = run_train(live["cfg"], TrainOptions(num_workers=1, epochs=2))["version"]
    _serve_version(url, version)
    loaded = registry.load_version(live["storage"], version)
    assert loaded.watermark_ms >= ahead_s * 1000 > time.time() * 1000  # the version's event time is in the future
    assert _post(f"{url}/events", json=_now_events("after-the-skew", [0, 3, 6])).json()["accepted"] == 3
    for body in _from_both_replicas(f"{url}/recommend/after-the-skew?k=5"):
        assert body["path"] == "folded" and body["version"] == version, body
