"""The one typed configuration: defaults, refusals with one line naming the key, comments on every key."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from core.config import AppConfig, ConfigError, load_config, parse_config

ROOT = Path(__file__).resolve().parents[2]


def test_repository_config_loads_and_matches_model_defaults() -> None:
    cfg = load_config(ROOT / "ray_config.yaml")
    assert cfg == AppConfig()


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        ({"train": {"epochs": "many"}}, "train.epochs: Input should be a valid integer"),
        ({"serve": {"mystery": 1}}, "serve.mystery: unknown key"),
        ({"nosuchsection": {}}, "nosuchsection: unknown key"),
        ({"data": {"source": {"format": "xml"}}}, "data.source.format:"),
        ({"data": {"source": {"path": "/no/such/file-*.csv"}}}, "data.source.path: no file matches"),
        ({"data": {"source": {"columns": {"userid": "u"}}}}, "data.source.columns:"),
        ({"serve": {"min_replicas": 3, "max_replicas": 2}}, "min_replicas must not exceed max_replicas"),
        ({"cluster": {"gpu_workers": {"min_workers": 3, "max_workers": 1}}},
         "cluster.gpu_workers: Value error, min_workers must not exceed max_workers"),
    ],
)
def test_bad_config_is_refused_with_one_line_naming_the_key(raw: dict, message: str) -> None:
    with pytest.raises(ConfigError) as err:
        parse_config(raw, source="cfg.yaml")
    text = str(err.value)
    assert message in text and "\n" not in text


def test_object_store_root_is_accepted() -> None:
    assert parse_config({"data": {"root": "s3://bucket/prefix"}}).data.root == "s3://bucket/prefix"


def _keys(model: type, prefix: str = "") -> set[str]:
    out = set()
    for name, field in model.model_fields.items():
        out.add(prefix + name)
        ann = field.annotation
        if isinstance(ann, type) and hasattr(ann, "model_fields"):
            out |= _keys(ann, prefix + name + ".")
    return out


def test_every_key_is_in_the_yaml_with_a_comment_and_described_in_the_model() -> None:
    text = (ROOT / "ray_config.yaml").read_text()
    raw = yaml.safe_load(text)
    in_yaml: set[str] = set()

    def walk(node: dict, prefix: str = "") -> None:
        for k, v in node.items():
            in_yaml.add(prefix + k)
            if isinstance(v, dict) and k not in ("columns", "event_weights"):
                walk(v, prefix + k + ".")

    walk(raw)
    assert in_yaml == _keys(AppConfig)
    for line in text.splitlines():
        stripped = line.strip()
        if stripped and not stripped.startswith("#") and ":" in stripped and not stripped.endswith(":"):
            assert "#" in stripped, f"uncommented key: {line!r}"

    def described(model: type) -> None:
        for name, field in model.model_fields.items():
            assert field.description, f"{model.__name__}.{name} has no description"
            if isinstance(field.annotation, type) and hasattr(field.annotation, "model_fields"):
                described(field.annotation)

    described(AppConfig)


def _run(*args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", *args], cwd=cwd, capture_output=True, text=True, timeout=120)


def test_cli_refuses_a_missing_or_broken_config_with_one_line(tmp_path: Path) -> None:
    res = _run("datasets.ingest", "--config", str(tmp_path / "absent.yaml"))
    assert res.returncode == 2 and res.stderr.strip().count("\n") == 0 and "absent.yaml" in res.stderr
    bad = tmp_path / "bad.yaml"
    bad.write_text("train:\n  lr: -1  # negative\n")
    res = _run("datasets.ingest", "--config", str(bad))
    assert res.returncode == 2 and "train.lr" in res.stderr and res.stderr.strip().count("\n") == 0


def test_readme_config_reference_is_generated_from_the_model() -> None:
    from cluster.config_doc import render

    assert render() in (ROOT / "README.md").read_text(), "run: python -m cluster.config_doc and paste into README"
