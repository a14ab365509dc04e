"""End to end on a real local cluster, the way a user runs it: `ray start --head`, `ray job submit` of ingest and
train, `serve deploy` of the config in cluster/, recommendations over HTTP, an update job whose version the
deployed app swaps in, and the cluster stopped again.

Every port of the cluster is chosen free, so it can run beside the test session's embedded Ray.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import requests
import yaml

from datasets.synth import generate
from tests.cluster.local_cluster import BIN, ROOT, job_submit, local_cluster, run, wait_for_version
from tests.helpers import free_port

pytestmark = [pytest.mark.slow, pytest.mark.ray]


@pytest.fixture()
def cluster():
    with local_cluster("e2e", num_cpus=2) as c:
        yield c


def test_jobs_and_serve_deploy_on_a_real_cluster(cluster: dict, tmp_path: Path) -> None:
    address, env = cluster["address"], cluster["env"]
    logs, root = tmp_path / "logs", tmp_path / "root"
    generate(logs, users=300, items=400, events=20_000, days=6, seed=5)
    port = free_port()
    config = tmp_path / "ray_config.yaml"
    config.write_text(yaml.safe_dump({
        "data": {"root": str(root), "shards": 2, "source": {"path": str(logs / "*.csv"), "format": "events"}},
        "train": {"epochs": 2, "num_workers": 1, "embedding_dim": 16, "num_layers": 2, "batch_size": 512,
                  "holdout_days": 1.0},
        "update": {"max_steps": 20, "tolerance": 1.0},
        "serve": {"min_replicas": 1, "max_replicas": 1, "num_cpus": 0.2, "poll_interval_s": 0.5},
    }))

    ingested = job_submit(address, env, "datasets.ingest", "--config", str(config))
    assert ingested["input_rows"] == ingested["accepted"] + ingested["rejected"]["total"] + ingested["duplicates"]
    assert ingested["accepted"] > 15_000 and ingested["total_users"] > 0

    helper = run(sys.executable, "-m", "cluster.jobs", "--address", address, "train", "--", "--config",
                 str(config), env=env)  # the thin helper, as a user runs it
    trained = json.loads(helper.stdout.strip().splitlines()[-1])
    assert trained["status"] == "SUCCEEDED", helper.stderr[-3000:]
    first = trained["summary"]["version"]
    assert first == "v000001" and trained["summary"]["metrics"]["recall@20"] >= 0

    deploy = tmp_path / "serve_config.yaml"
    doc = yaml.safe_load((ROOT / "cluster" / "serve_config.yaml").read_text())
    doc["http_options"] = {"host": "127.0.0.1", "port": port}
    doc["applications"][0]["args"]["config_path"] = str(config)
    deploy.write_text(yaml.safe_dump(doc))
    run(str(BIN / "serve"), "deploy", str(deploy), "--address", address, env=env)
    url = f"http://127.0.0.1:{port}"
    wait_for_version(url, first, 120)
    first_log = sorted(logs.glob("*.csv"))[0]
    user = first_log.read_text().splitlines()[1].split(",")[0]  # a shopper of the first day: known to the model
    body = requests.get(f"{url}/recommend/{user}", params={"k": 10}, timeout=30).json()
    assert body["path"] == "personalised" and body["version"] == first and len(body["items"]) == 10

    # A day later: new logs, an update job on the same cluster, and the deployed app serves its version.
    generate(tmp_path / "more", users=60, items=80, events=3_000, days=1, seed=6)
    for f in (tmp_path / "more").glob("*.csv"):
        f.rename(logs / f"later-{f.name}")
    updated = job_submit(address, env, "trainers.update", "--config", str(config), "--once")
    assert updated["mode"] == "warm" and updated["parent"] == first and updated["ingested"]["accepted"] > 0
    assert updated["version"] is not None, updated  # update.tolerance 1.0 here: this test is about the swap
    assert wait_for_version(url, updated["version"], 30) < 30
    again = requests.get(f"{url}/recommend/{user}", params={"k": 10}, timeout=30).json()
    assert again["version"] == updated["version"]
