"""The cluster files in cluster/ are valid and agree with ray_config.yaml, so they cannot drift apart."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import yaml

from core.config import AppConfig, load_config
from core.runtime import HIGH_THROUGHPUT_ENV
from serve_app.app import AppArgs, deployment_options

ROOT = Path(__file__).resolve().parents[2]
IMPORT_PATH = "serve_app.app:build_app"


@pytest.fixture(scope="module")
def cfg() -> AppConfig:
    return load_config(ROOT / "ray_config.yaml")


@pytest.fixture(scope="module")
def launcher() -> dict:
    return yaml.safe_load((ROOT / "cluster" / "launcher.yaml").read_text())


@pytest.fixture(scope="module")
def rayservice() -> dict:
    return yaml.safe_load((ROOT / "cluster" / "kuberay-rayservice.yaml").read_text())


def _serve_apps(doc: dict) -> list[dict]:
    return doc["applications"]


def _check_serve_app(doc: dict, cfg: AppConfig) -> None:
    (app,) = _serve_apps(doc)
    assert app["import_path"] == IMPORT_PATH
    args = AppArgs(**app["args"])  # the builder's own validation
    assert Path(args.config_path).name == "ray_config.yaml" and args.root is None
    assert doc["http_options"]["port"] == cfg.serve.port
    for deployment in app.get("deployments", []):  # overrides, if any, must say what ray_config.yaml says
        opts = deployment_options(cfg)
        for key, value in deployment.items():
            if key != "name":
                assert opts[key] == value, f"{key} in the deploy config disagrees with ray_config.yaml"


def test_launcher_config_passes_rays_own_schema_validation(launcher: dict) -> None:
    from ray.autoscaler._private.util import prepare_config, validate_config

    validate_config(prepare_config(copy.deepcopy(launcher)))
    broken = copy.deepcopy(launcher)
    broken["available_node_types"]["cpu_worker"]["min_workers"] = "one"
    with pytest.raises(Exception, match="one"):
        validate_config(prepare_config(broken))


def test_launcher_agrees_with_ray_config(launcher: dict, cfg: AppConfig) -> None:
    c = cfg.cluster
    types = launcher["available_node_types"]
    assert types[launcher["head_node_type"]]["resources"] == {"CPU": c.head_cpus}
    for name, group in (("cpu_worker", c.cpu_workers), ("gpu_worker", c.gpu_workers)):
        node = types[name]
        assert (node["min_workers"], node["max_workers"]) == (group.min_workers, group.max_workers), name
        want = {"CPU": group.cpus, **({"GPU": group.gpus} if group.gpus else {})}
        assert node["resources"] == want, name
    assert launcher["max_workers"] == c.cpu_workers.max_workers + c.gpu_workers.max_workers
    assert launcher["idle_timeout_minutes"] == c.idle_timeout_minutes
    assert launcher["upscaling_speed"] == c.upscaling_speed
    assert f"--num-cpus={c.head_cpus}" in " ".join(launcher["head_start_ray_commands"])


def test_launcher_nodes_start_with_token_auth_and_the_secrets(launcher: dict) -> None:
    """The jobs API runs code with the nodes' secrets: token authentication on every node, the dashboard on the
    head's loopback, and the secrets from files kept outside the repository, on every node."""
    head = " ".join(launcher["head_start_ray_commands"])
    worker = " ".join(launcher["worker_start_ray_commands"])
    for command in (head, worker):
        assert "RAY_AUTH_MODE=token" in command and ". ~/interest-graph.env" in command
    assert "--dashboard-host=127.0.0.1" in head and "0.0.0.0" not in head
    mounts = launcher["file_mounts"]
    assert "~/.ray/auth_token" in mounts and "~/interest-graph.env" in mounts
    assert all(not str(src).startswith((".", "/work")) for dst, src in mounts.items() if dst != "~/interest-graph")


def test_kuberay_rayservice_agrees_with_ray_config(rayservice: dict, cfg: AppConfig) -> None:
    c = cfg.cluster
    assert rayservice["kind"] == "RayService" and rayservice["apiVersion"] == "ray.io/v1"
    _check_serve_app(yaml.safe_load(rayservice["spec"]["serveConfigV2"]), cfg)
    cluster = rayservice["spec"]["rayClusterConfig"]
    assert cluster["enableInTreeAutoscaling"] is True
    assert cluster["autoscalerOptions"]["idleTimeoutSeconds"] == int(c.idle_timeout_minutes * 60)
    head = cluster["headGroupSpec"]
    assert head["rayStartParams"]["num-cpus"] == str(c.head_cpus)
    (head_container,) = head["template"]["spec"]["containers"]
    assert head_container["resources"]["limits"] == {"cpu": str(c.head_cpus), "memory": f"{c.head_memory_gib}Gi"}
    groups = {g["groupName"]: g for g in cluster["workerGroupSpecs"]}
    assert set(groups) == {"cpu-workers", "gpu-workers"}
    for name, group in (("cpu-workers", c.cpu_workers), ("gpu-workers", c.gpu_workers)):
        spec = groups[name]
        assert (spec["minReplicas"], spec["maxReplicas"]) == (group.min_workers, group.max_workers), name
        assert group.min_workers <= spec["replicas"] <= group.max_workers
        assert spec["rayStartParams"]["num-cpus"] == str(group.cpus)
        assert spec["rayStartParams"].get("num-gpus", "0") == str(group.gpus)
        (container,) = spec["template"]["spec"]["containers"]
        limits = {"cpu": str(group.cpus), "memory": f"{group.memory_gib}Gi",
                  **({"nvidia.com/gpu": str(group.gpus)} if group.gpus else {})}
        assert container["resources"]["limits"] == limits, name
    for container in [head_container, *[g["template"]["spec"]["containers"][0] for g in groups.values()]]:
        env = {e["name"]: e.get("value") for e in container["env"]}
        # Every group may run replicas (serve.num_gpus puts them on GPU nodes): each carries every secret.
        assert {"IG_PSEUDONYM_KEY", "IG_ADMIN_TOKEN", "IG_EVENTS_TOKEN"} <= set(env), container["name"]
        ha = {k: env.get(k) for k in HIGH_THROUGHPUT_ENV}
        assert ha == (HIGH_THROUGHPUT_ENV if cfg.serve.high_throughput else dict.fromkeys(HIGH_THROUGHPUT_ENV))
    containers = [c_ for g in [head, *groups.values()] for c_ in g["template"]["spec"]["containers"]]
    assert all(c_.get("image", "").startswith(c.image) for c_ in containers)
    for container in containers:  # Ray's token auth everywhere: an open jobs API runs anyone's code
        env = {e["name"]: e for e in container["env"]}
        assert env["RAY_AUTH_MODE"]["value"] == "token" and "secretKeyRef" in env["RAY_AUTH_TOKEN"]["valueFrom"]


def test_serve_deploy_config_agrees_with_ray_config(cfg: AppConfig) -> None:
    _check_serve_app(yaml.safe_load((ROOT / "cluster" / "serve_config.yaml").read_text()), cfg)


def test_resources_fit_the_cluster(cfg: AppConfig) -> None:
    """A replica and a training worker fit on one worker node; the configured training fits the cluster."""
    c, s, t = cfg.cluster, cfg.serve, cfg.train
    assert s.num_cpus <= c.cpu_workers.cpus and s.num_gpus <= max(c.cpu_workers.gpus, c.gpu_workers.gpus)
    group = c.gpu_workers if t.use_gpu else c.cpu_workers
    assert t.cpus_per_worker <= group.cpus
    capacity = group.max_workers * (group.gpus if t.use_gpu else group.cpus // max(int(t.cpus_per_worker), 1))
    assert t.num_workers <= capacity
