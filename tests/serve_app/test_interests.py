"""The interest graph as a product, over real HTTP with two replicas on a really trained version: interest
profiles (evidence, live events on every replica, latent interests), explanations that are faithful to the scores,
audiences (the Ray Data job and the admin endpoint), the operators' endpoints, and the explorer page in Chromium."""

from __future__ import annotations

import math
import os
import time
import uuid
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import requests

import registry
from core.storage import Storage
from datasets.ingest import Request, run_ingest
from datasets.pseudonym import pseudonymise
from serve_app.audience import build_audience
from tests.helpers import PRODUCER, make_config, start_app, stop_app, write_config
from trainers.train import TrainOptions, run_train

pytestmark = pytest.mark.slow
ADMIN = {"Authorization": "Bearer test-admin-token"}  # set for Ray workers by tests/conftest.py
KEY = os.environ["IG_PSEUDONYM_KEY"].encode()
HEADER = "user_id,item_id,event,ts,category_id,brand_id,price,session_id\n"
N_USERS, N_ITEMS, N_CATS, N_BRANDS = 60, 120, 6, 3
DAY = 86_400_000
T = 1_767_225_600_000  # the newest background event: the log's watermark
# Alice, days before T: a purchase in cat-0, three views in cat-1, a click in cat-2 long ago.
ALICE = [("item-0", "purchase", 1.0), ("item-1", "view", 2.0), ("item-7", "view", 2.0), ("item-13", "view", 2.0),
         ("item-2", "click", 10.0)]
BOB = [("item-0", "view", 1.5), ("item-6", "cart", 1.5), ("item-1", "view", 1.5)]  # cat-0 and cat-1 only
ARTIFACTS = Path(os.environ.get("IG_TEST_ARTIFACTS", Path(__file__).resolve().parents[2] / "test-artifacts"))


def _cat(item: str) -> str:
    return f"cat-{int(item.split('-')[1]) % N_CATS}"


def _brand(item: str) -> str:
    return f"brand-{int(item.split('-')[1]) % N_BRANDS}"


def _row(user: str, item: str, event: str, ts: int) -> str:
    return f"{user},{item},{event},{ts},{_cat(item)},{_brand(item)},,\n"


def _write_log(path: Path) -> None:
    rng = np.random.default_rng(7)
    events = ["view", "click", "cart", "fav", "purchase"]
    lines = [HEADER]
    for u in range(N_USERS):  # each background shopper leans to one category
        taste = u % N_CATS
        for _ in range(20):
            c = taste if rng.random() < 0.7 else int(rng.integers(N_CATS))
            item = f"item-{c + N_CATS * int(rng.integers(N_ITEMS // N_CATS))}"
            lines.append(_row(f"u-{u}", item, events[int(rng.integers(5))], T - int(rng.integers(4 * DAY))))
    lines.append(_row("u-0", "item-0", "view", T))
    for user, history in (("alice", ALICE), ("bob", BOB), ("carol", BOB), ("erin", BOB)):
        lines += [_row(user, item, event, T - int(days * DAY)) for item, event, days in history]
    path.write_text("".join(lines))


@pytest.fixture(scope="module")
def app(ray_session, tmp_path_factory: pytest.TempPathFactory):
    base = tmp_path_factory.mktemp("interests")
    root = base / "root"
    _write_log(base / "log.csv")
    cfg = make_config(root, train={"epochs": 3, "batch_size": 256, "embedding_dim": 16, "num_layers": 1,
                                   "num_workers": 1, "holdout": "last_days", "holdout_days": 0.5})
    run_ingest(cfg, Request(source=str(base / "log.csv"), fmt="events", holdout=None))
    version = run_train(cfg, TrainOptions(num_workers=1))["version"]
    serve = {"min_replicas": 2, "max_replicas": 2, "num_cpus": 0.1, "poll_interval_s": 0.2, "max_k": 200,
             "max_audience": 50}
    config = write_config(base / "cfg.yaml", root=str(root), serve=serve)
    url = start_app(config, "interests", version)
    yield {"url": url, "cfg": cfg, "version": version, "storage": Storage(str(root)), "root": str(root)}
    stop_app("interests", str(root))


def _get(url: str, **kwargs) -> requests.Response:
    return requests.get(url, **{"timeout": 30, **kwargs})


def _from_both_replicas(url: str, **kwargs) -> list[requests.Response]:
    answers: list[requests.Response] = []
    while len({a.json().get("replica") for a in answers}) < 2:
        assert len(answers) < 60, "one replica never answered"
        answers.append(_get(url, **kwargs))
    return answers


def _post(url: str, events: list[dict]) -> dict:
    r = requests.post(f"{url}/events", json={"events": events}, headers=PRODUCER, timeout=30)
    assert r.status_code == 200, r.text
    return r.json()


def _event(user: str, item: str, event: str, ts: int) -> dict:
    return {"user_id": user, "item_id": item, "event": event, "ts": ts, "category_id": _cat(item),
            "brand_id": _brand(item)}


def test_a_profile_follows_the_configured_event_weights_and_recency(app: dict) -> None:
    r = _get(f"{app['url']}/interests/alice", params={"k": 10})
    assert r.status_code == 200, r.text
    body = r.json()
    weights, half_life = app["cfg"].data.event_weights, app["cfg"].data.half_life_days
    expected: dict[str, float] = {}
    for item, event, days in ALICE:
        expected[_cat(item)] = expected.get(_cat(item), 0.0) + weights[event] * 0.5 ** (days / half_life)
    order = sorted(expected, key=lambda c: -expected[c])
    assert [c["category"] for c in body["categories"]] == order == ["cat-0", "cat-1", "cat-2"]
    total = sum(expected.values())
    for c in body["categories"]:
        assert c["weight"] == pytest.approx(expected[c["category"]] / total, abs=2e-3), c
    cat0, cat1, cat2 = body["categories"]
    assert cat0["events"] == {"purchase": 1} and cat1["events"] == {"view": 3} and cat2["events"] == {"click": 1}
    assert cat0["last_seen_ms"] == T - DAY and cat2["last_seen_ms"] == T - 10 * DAY
    assert cat2["trend"] == "fading"  # touched only long ago
    assert [b["brand"] for b in body["brands"]] == ["brand-0", "brand-1", "brand-2"]
    assert body["path"] == "personalised" and body["version"] == app["version"]


def test_latent_interests_are_untouched_categories_and_brands(app: dict) -> None:
    body = _get(f"{app['url']}/interests/alice", params={"k": 10}).json()
    touched = {c["category"] for c in body["categories"]}
    latent = [c["category"] for c in body["latent"]["categories"]]
    assert latent and not touched & set(latent)
    assert set(latent) <= {f"cat-{c}" for c in range(N_CATS)}
    sims = [c["score"] for c in body["latent"]["categories"]]
    assert sims == sorted(sims, reverse=True)
    assert not {b["brand"] for b in body["brands"]} & {b["brand"] for b in body["latent"]["brands"]}


def test_a_posted_click_is_in_the_profile_on_every_replica_at_once(app: dict) -> None:
    url = app["url"]
    before = _get(f"{url}/interests/bob").json()
    assert "cat-4" not in {c["category"] for c in before["categories"]}
    answer = _post(url, [_event("bob", "item-10", "click", int(time.time() * 1000))])  # item-10: cat-4
    assert answer["applied_everywhere"] is True
    answers = _from_both_replicas(f"{url}/interests/bob")
    for a in answers:  # the very first answer of each replica after the POST returned already has it
        cats = {c["category"]: c for c in a.json()["categories"]}
        assert "cat-4" in cats and cats["cat-4"]["live_events"] == 1 and cats["cat-4"]["events"] == {"click": 1}, (
            answer, [x.json() for x in _from_both_replicas(f"{url}/admin/users/bob/live", headers=ADMIN)])
        assert "cat-4" not in {c["category"] for c in a.json()["latent"]["categories"]}


def test_unknown_and_deleted_shoppers_get_404_and_bad_input_4xx(app: dict) -> None:
    url = app["url"]
    r = _get(f"{url}/interests/nobody-{uuid.uuid4().hex}")
    assert r.status_code == 404 and "no interest profile" in r.json()["detail"]
    assert _get(f"{url}/interests/carol").status_code == 200
    deleted = requests.delete(f"{url}/users/carol", headers=ADMIN, timeout=30).json()
    assert deleted["deleted"] is True and deleted["applied_everywhere"] is True
    for _ in range(10):  # whichever replica answers
        r = _get(f"{url}/interests/carol")
        assert r.status_code == 404 and "no interest profile" in r.json()["detail"], r.text
    assert _get(f"{url}/recommend/carol", params={"explain": "true"}).json()["path"] == "popular"
    for params, status in (({"k": 0}, 400), ({"k": 201}, 400), ({"k": "x"}, 422)):
        r = _get(f"{url}/interests/alice", params=params)
        assert r.status_code == status and r.json()["detail"], (params, r.text)
    assert _get(f"{url}/interests/{'a' * 300}").status_code == 400


def test_explanations_are_faithful_to_the_scores(app: dict) -> None:
    """A new shopper's vector is made of their live events alone. For each recommended item, the event the
    explanation names is the one whose absence (another new shopper posting all the others) lowers its score most."""
    url, now = app["url"], int(time.time() * 1000)
    history = [("item-0", "purchase"), ("item-8", "cart"), ("item-15", "click"), ("item-22", "view"),
               ("item-27", "fav")]
    tag = uuid.uuid4().hex[:8]

    def scores(user: str, events: list[tuple[str, str]]) -> dict[str, float]:
        _post(url, [_event(user, item, event, now) for item, event in events])
        body = _get(f"{url}/recommend/{user}", params={"k": 200, "exclude_seen": "false"}).json()
        assert body["path"] == "folded"
        return {it["item_id"]: it["score"] for it in body["items"]}

    full = scores(f"full-{tag}", history)
    shown = _get(f"{url}/recommend/full-{tag}", params={"k": 3, "explain": "true"}).json()
    without = {item: scores(f"without-{item}-{tag}", [h for h in history if h[0] != item]) for item, _ in history}
    for rec in shown["items"]:
        because = rec["because"]
        assert because and all(b["source"] == "live" for b in because), rec
        drops = {item: full[rec["item_id"]] - without[item][rec["item_id"]] for item in without}
        named = because[0]["item_id"]
        assert drops[named] == pytest.approx(max(drops.values()), abs=2e-6), (rec, drops)
        assert because[0]["contribution"] == pytest.approx(drops[named], abs=1e-4)
        assert [b["contribution"] for b in because] == sorted((b["contribution"] for b in because), reverse=True)
        for b in because:
            assert ("category" in b) == (_cat(b["item_id"]) == _cat(rec["item_id"]))


def test_a_known_shoppers_explanations_come_from_their_history(app: dict) -> None:
    body = _get(f"{app['url']}/recommend/alice", params={"k": 5, "explain": "true"}).json()
    assert body["path"] == "personalised"
    alice_items = {item for item, _, _ in ALICE}
    for rec in body["items"]:
        assert rec["because"], rec
        assert {b["item_id"] for b in rec["because"]} <= alice_items
        assert all(b["source"] == "history" and b["contribution"] > 0 for b in rec["because"])
    popular = _get(f"{app['url']}/recommend/nobody-{uuid.uuid4().hex}", params={"explain": "true"}).json()
    assert popular["path"] == "popular" and all(it["because"] == [{"source": "popular"}] for it in popular["items"])


def test_the_audience_job_is_ordered_pseudonymous_and_reproducible(app: dict) -> None:
    cfg = app["cfg"]
    first = build_audience(cfg, "cat-0", None, 25)
    table = pq.read_table(first["path"])
    assert table.column_names == ["user_key", "affinity", "rank"] and table.num_rows == 25
    assert table["rank"].to_pylist() == list(range(1, 26))
    affinity = table["affinity"].to_pylist()
    assert affinity == sorted(affinity, reverse=True)
    raw_ids = {f"u-{u}" for u in range(N_USERS)} | {"alice", "bob", "carol", "erin"}
    keys = table["user_key"].to_pylist()
    assert not raw_ids & set(keys) and all(len(k) >= 16 and k.isalnum() for k in keys)
    version = registry.load_version(app["storage"], app["version"])
    assert set(keys) <= {k for k in version.user_keys if k is not None}
    assert first["path"].startswith(str(Path(app["root"]) / "audiences" / app["version"]))
    again = build_audience(cfg, "cat-0", None, 25, version=app["version"])
    assert pq.read_table(again["path"]).equals(table)
    # The admin endpoint scores the same way: same shoppers in the same order.
    r = _get(f"{app['url']}/audiences", params={"category": "cat-0", "top": 25}, headers=ADMIN)
    assert r.status_code == 200, r.text
    assert [u["user_key"] for u in r.json()["users"]] == keys
    brand = build_audience(cfg, None, "brand-1", 5)
    assert pq.read_table(brand["path"]).num_rows == 5
    # A shopper deleted since the version was trained is in no audience, even one that takes everybody.
    assert requests.delete(f"{app['url']}/users/erin", headers=ADMIN, timeout=30).json()["deleted"] is True
    everybody = pq.read_table(build_audience(cfg, "cat-0", None, 1000)["path"])["user_key"].to_pylist()
    assert pseudonymise("erin", KEY) not in everybody and pseudonymise("alice", KEY) in everybody
    r = _get(f"{app['url']}/audiences", params={"brand": "brand-0", "top": 50}, headers=ADMIN)
    assert pseudonymise("erin", KEY) not in {u["user_key"] for u in r.json()["users"]}


def test_the_audience_endpoint_needs_the_admin_token_and_a_known_target(app: dict) -> None:
    url = f"{app['url']}/audiences"
    assert _get(url, params={"category": "cat-0"}).status_code == 401
    assert _get(url, params={"category": "cat-0"}, headers={"Authorization": "Bearer wrong"}).status_code == 403
    for params, status in (({"category": "no-such", "top": 10}, 404), ({"top": 10}, 400),
                           ({"category": "cat-0", "brand": "brand-0", "top": 10}, 400),
                           ({"category": "cat-0", "top": 0}, 400), ({"category": "cat-0", "top": 51}, 400),
                           ({"category": "cat-0"}, 400)):  # the default top (100) is over serve.max_audience
        r = _get(url, params=params, headers=ADMIN)
        assert r.status_code == status and r.json()["detail"], (params, r.text)


def test_operator_endpoints_show_versions_curves_ingestion_and_live_events(app: dict) -> None:
    url = app["url"]
    for path in ("/admin/versions", "/admin/ingestion", "/admin/users/bob/live",
                 f"/admin/versions/{app['version']}/curve.png"):
        assert _get(url + path).status_code == 401, path
    versions = _get(f"{url}/admin/versions", headers=ADMIN).json()
    newest = versions["versions"][0]
    assert newest["version"] == app["version"] == versions["serving"] and newest["serving"] and newest["curve"]
    assert newest["metrics"] and not any(math.isnan(v) for v in newest["metrics"].values())
    png = _get(f"{url}/admin/versions/{app['version']}/curve.png", headers=ADMIN)
    assert png.status_code == 200 and png.headers["content-type"] == "image/png" and png.content[:4] == b"\x89PNG"
    assert _get(f"{url}/admin/versions/v999999/curve.png", headers=ADMIN).status_code == 404
    assert _get(f"{url}/admin/versions/..%2Fstate/curve.png", headers=ADMIN).status_code in (400, 404)
    ingestion = _get(f"{url}/admin/ingestion", headers=ADMIN).json()
    assert ingestion["run"] and ingestion["accepted"] > 0 and "by_reason" in ingestion["rejected"]
    _post(url, [_event("dora", "item-3", "fav", int(time.time() * 1000))])
    live = _get(f"{url}/admin/users/dora/live", headers=ADMIN).json()
    assert [(e["item_id"], e["event"], e["in_model"]) for e in live["events"]] == [("item-3", "fav", False)]


def test_the_explorer_page_in_a_real_browser(app: dict) -> None:
    from playwright.sync_api import sync_playwright

    chromium = os.environ.get("IG_CHROMIUM", "/usr/bin/chromium")
    assert Path(chromium).exists(), f"{chromium} is missing: apt-get install -y chromium (or set IG_CHROMIUM)"
    page_url = f"{app['url']}/ui"
    r = _get(page_url)
    assert r.status_code == 200 and "text/html" in r.headers["content-type"]
    assert "default-src 'none'" in r.headers["content-security-policy"]
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    errors: list[str] = []
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=chromium, headless=True,
                                     args=["--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                                           "--disable-background-networking"])
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 1000})
            page.on("pageerror", lambda e: errors.append(str(e)))
            page.goto(page_url)
            page.fill("#token", "test-admin-token")
            page.dispatch_event("#token", "change")
            page.wait_for_selector("#versions table", timeout=30_000)
            page.wait_for_selector("#ingestion table", timeout=30_000)
            page.fill("#user", "alice")
            page.click("#go")
            page.wait_for_selector("#profile table", timeout=30_000)
            page.wait_for_selector("#recommendations table", timeout=30_000)
            page.wait_for_selector("#live p, #live table", timeout=30_000)
            profile = page.inner_text("#profile")
            assert "cat-0" in profile and "purchase 1" in profile and "Latent interests" in profile
            recs = page.inner_text("#recommendations")
            assert "because of" in recs and "personalised" in recs
            assert app["version"] in page.inner_text("#versions")
            assert page.locator("#versions img.curve").count() >= 1
            page.screenshot(path=str(ARTIFACTS / "explorer.png"), full_page=True)
        finally:
            browser.close()
    assert not errors, errors
    assert (ARTIFACTS / "explorer.png").stat().st_size > 10_000
