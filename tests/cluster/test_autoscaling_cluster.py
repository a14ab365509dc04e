"""Ray's autoscaler adding and removing nodes for this app, shown on a simulated cluster rather than assumed.

Ray's fake multi-node provider (`RAY_FAKE_CLUSTER=1`, provider type `fake_multinode`) starts each "node" the
autoscaler asks for as another raylet on this machine. The node types are cluster/launcher.yaml's, read from that
file (which tests/cluster/test_deploy_files.py holds to ray_config.yaml's `cluster:` section): the same types, bounds
and head, CPUs divided by four and the idle timeout by fifty so that they fit a test. A training job that asks for
more workers than the head and the minimum workers offer, and Serve load that autoscales the recommender's replicas
past that capacity while a second training job runs, make the autoscaler add worker nodes; every request is
answered meanwhile; once both are idle past the timeout the nodes are removed again, down to the launcher's
minimum.
"""

from __future__ import annotations

import json
import signal
import subprocess
import time
from pathlib import Path

import pytest
import requests
import yaml

from bench.load import parse_summary, require_hey
from datasets.synth import generate
from tests.cluster.local_cluster import (
    BIN,
    ROOT,
    job_submit,
    local_cluster,
    run,
    submit_command,
    wait_for_version,
)
from tests.helpers import free_port

pytestmark = [pytest.mark.slow, pytest.mark.ray]

CPU_SCALE = 4  # a simulated node has a quarter of the launcher's CPUs
TIMEOUT_SCALE = 50  # and a fiftieth of its idle timeout (5 minutes -> 6 s)
NODE_STORE = 256 * 1024**2  # object store per simulated node: they all share this machine's memory
TRAIN_WORKERS = 4  # more than the head (1 CPU) and the minimum worker node (2 CPUs) offer together


def simulated_cluster(launcher: dict, gcs_address: str) -> tuple[dict, int]:
    """The fake provider's cluster config for the launcher's node types, and the head's CPUs."""
    types = launcher["available_node_types"]
    head = types[launcher["head_node_type"]]
    workers = {}
    for name, node in types.items():
        if name == launcher["head_node_type"]:
            continue
        resources = {**node["resources"], "CPU": max(1, node["resources"]["CPU"] // CPU_SCALE),
                     "object_store_memory": NODE_STORE}
        workers[name] = {"resources": resources, "node_config": {}, "min_workers": node.get("min_workers", 0),
                         "max_workers": node["max_workers"]}
    head_cpus = max(1, head["resources"]["CPU"] // CPU_SCALE)
    workers["ray.head.default"] = {"resources": {"CPU": head_cpus}, "node_config": {}, "max_workers": 0}
    config = {
        "cluster_name": "simulated-" + launcher["cluster_name"],
        "max_workers": launcher["max_workers"],
        "upscaling_speed": launcher["upscaling_speed"],
        "idle_timeout_minutes": launcher["idle_timeout_minutes"] / TIMEOUT_SCALE,
        "provider": {"type": "fake_multinode", "use_node_id_as_ip": True, "disable_node_updaters": True,
                     "disable_launch_config_check": True, "gcs_address": gcs_address},
        "available_node_types": workers,
        "head_node_type": "ray.head.default",
        "auth": {}, "docker": {}, "file_mounts": {}, "cluster_synced_files": [], "file_mounts_sync_continuously": False,
        "rsync_exclude": [], "rsync_filter": [], "initialization_commands": [], "setup_commands": [],
        "head_setup_commands": [], "worker_setup_commands": [], "head_start_ray_commands": [],
        "worker_start_ray_commands": [],
    }
    return config, head_cpus


class Nodes:
    """Alive nodes of the cluster over time, from the dashboard's state API (the way an operator would look)."""

    def __init__(self, address: str, token: str) -> None:
        self.address, self.headers = address, {"Authorization": f"Bearer {token}"}
        self.seen: list[tuple[float, int]] = []

    def alive(self) -> int:
        got = requests.get(f"{self.address}/api/v0/nodes", params={"limit": 100}, headers=self.headers, timeout=30)
        got.raise_for_status()
        count = sum(n["state"] == "ALIVE" for n in got.json()["data"]["result"]["result"])
        self.seen.append((time.time(), count))
        return count

    def wait_for(self, wanted: int, timeout_s: float) -> float:
        started = time.time()
        while time.time() - started < timeout_s:
            if self.alive() == wanted:
                return time.time() - started
            time.sleep(2)
        raise AssertionError(f"alive nodes never reached {wanted} within {timeout_s} s: {self.seen[-10:]}")

    def peak_while(self, job: Job, timeout_s: float) -> int:
        """The most alive nodes seen while `job` runs; it must succeed within `timeout_s`."""
        started, peak = time.time(), 0
        while job.proc.poll() is None:
            if time.time() - started > timeout_s:
                job.proc.kill()
                raise AssertionError(f"{job.proc.args} still running after {timeout_s} s:\n{job.tail()}")
            peak = max(peak, self.alive())
            time.sleep(2)
        assert job.proc.returncode == 0, f"{job.proc.args} exited {job.proc.returncode}:\n{job.tail()}"
        return peak


class Job:
    """`ray job submit` running in the background, its output in a file.

    Without `--working-dir`: the simulated nodes share the head's session directory, so one node's runtime-env
    agent deleting an unused working dir pulls it from under another node's workers (torch then fails to load in
    them). On a real cluster each node has its own disk; here every node already has the project on PYTHONPATH.
    """

    def __init__(self, address: str, env: dict, log: Path, *args: str) -> None:
        self.log = log
        with log.open("w") as out:
            self.proc = subprocess.Popen(submit_command(address, *args, working_dir=False), cwd=ROOT, env=env,
                                         stdout=out, stderr=subprocess.STDOUT)

    def tail(self) -> str:
        return self.log.read_text(errors="replace")[-4000:]


def test_nodes_are_added_under_load_and_removed_when_idle(tmp_path: Path) -> None:
    hey = require_hey()
    import ray._private.services

    launcher = yaml.safe_load((ROOT / "cluster" / "launcher.yaml").read_text())
    gcs_port = free_port()
    gcs_address = f"{ray._private.services.get_node_ip_address()}:{gcs_port}"
    config, head_cpus = simulated_cluster(launcher, gcs_address)
    (tmp_path / "autoscaling.json").write_text(json.dumps(config))
    minimum = 1 + sum(t.get("min_workers", 0) for n, t in config["available_node_types"].items()
                      if n != "ray.head.default")
    with local_cluster("as", num_cpus=head_cpus, gcs_port=gcs_port,
                       extra_env={"RAY_FAKE_CLUSTER": "1", "AUTOSCALER_UPDATE_INTERVAL_S": "1"},
                       head_args=(f"--autoscaling-config={tmp_path / 'autoscaling.json'}",
                                  f"--object-store-memory={NODE_STORE}")) as cluster:
        address, env = cluster["address"], cluster["env"]
        nodes = Nodes(address, env["RAY_AUTH_TOKEN"])
        nodes.wait_for(minimum, 120)  # the launcher's min_workers come up first

        logs, root = tmp_path / "logs", tmp_path / "root"
        generate(logs, users=200, items=300, events=10_000, days=5, seed=5)
        port = free_port()
        app_config = tmp_path / "ray_config.yaml"
        app_config.write_text(yaml.safe_dump({
            "data": {"root": str(root), "shards": 2, "source": {"path": str(logs / "*.csv"), "format": "events"}},
            "train": {"epochs": 1, "num_workers": TRAIN_WORKERS, "embedding_dim": 8, "num_layers": 1,
                      "batch_size": 512, "holdout_days": 1.0},
            "serve": {"min_replicas": 1, "max_replicas": 3, "num_cpus": 1, "target_ongoing_requests": 1,
                      "upscale_delay_s": 1, "downscale_delay_s": 5, "poll_interval_s": 0.5, "high_throughput": False},
        }))
        job_submit(address, env, "datasets.ingest", "--config", str(app_config), working_dir=False)

        # A training job asking for more workers than the cluster has: its placement group waits for new nodes.
        first = Job(address, env, tmp_path / "train-1.log", "trainers.train", "--config", str(app_config))
        peak_training = nodes.peak_while(first, 420)
        assert peak_training > minimum, nodes.seen

        deploy = tmp_path / "serve_config.yaml"
        doc = yaml.safe_load((ROOT / "cluster" / "serve_config.yaml").read_text())
        # Every simulated node shares this machine's loopback, so one proxy (the head's) takes the port.
        doc["proxy_location"] = "HeadOnly"
        doc["http_options"] = {"host": "127.0.0.1", "port": port}
        doc["applications"][0]["args"]["config_path"] = str(app_config)
        deploy.write_text(yaml.safe_dump(doc))
        run(str(BIN / "serve"), "deploy", str(deploy), "--address", address, env=env)
        url = f"http://127.0.0.1:{port}"
        wait_for_version(url, "v000001", 180)
        user = sorted(logs.glob("*.csv"))[0].read_text().splitlines()[1].split(",")[0]

        # Serve load (replicas scale to their maximum) and a second training job at once, past the cluster's size.
        load = subprocess.Popen([hey, "-z", "600s", "-c", "8", "-t", "30", f"{url}/recommend/{user}?k=10"],
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        try:
            second = Job(address, env, tmp_path / "train-2.log", "trainers.train", "--config", str(app_config))
            peak_serving = nodes.peak_while(second, 420)
            wait_for_version(url, "v000002", 60)  # swapped in under load
        finally:
            load.send_signal(signal.SIGINT)  # hey stops and prints its summary
            summary = parse_summary(load.communicate(timeout=60)[0])
        assert peak_serving > minimum, nodes.seen
        assert summary["requests"] > 0 and summary["non_2xx"] == 0, summary

        # Idle: replicas back to their minimum, then the added nodes go once idle past the timeout.
        removed_after = nodes.wait_for(minimum, 300)
        assert requests.get(f"{url}/recommend/{user}", params={"k": 10}, timeout=30).status_code == 200
        print(json.dumps({"minimum": minimum, "peak_training": peak_training, "peak_serving": peak_serving,
                          "removed_after_s": round(removed_after, 1), "requests": summary["requests"]}))
