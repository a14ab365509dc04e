"""`python -m cluster.config_doc`: the config reference table for the README, generated from the model."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from pydantic import BaseModel

from core.config import AppConfig

BEGIN = "<!-- config-reference:begin -->"
END = "<!-- config-reference:end -->"


def _type_name(annotation: object) -> str:
    text = str(annotation).replace("typing.", "")
    if isinstance(annotation, type):
        text = annotation.__name__
    return text.replace("NoneType", "null").replace("Literal", "one of ").replace(" | ", " or ")


def _rows(model: type[BaseModel], instance: BaseModel, prefix: str = "") -> list[str]:
    rows = []
    for name, field in model.model_fields.items():
        value = getattr(instance, name)
        ann = field.annotation
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            rows += _rows(ann, value, f"{prefix}{name}.")
            continue
        default = json.dumps(value if not isinstance(value, dict) else dict(value))
        meaning = (field.description or "").replace("|", "\\|")
        rows.append(f"| `{prefix}{name}` | {_type_name(ann)} | `{default}` | {meaning} |")
    return rows


def render() -> str:
    lines = ["| key | type | default | meaning |", "| --- | --- | --- | --- |"]
    lines += _rows(AppConfig, AppConfig())
    return "\n".join([BEGIN, *lines, END])


def write_into(path: Path) -> None:
    """Replace the reference between the markers of a Markdown file."""
    text = path.read_text()
    start, end = text.index(BEGIN), text.index(END) + len(END)
    path.write_text(text[:start] + render() + text[end:])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m cluster.config_doc", description=__doc__)
    p.add_argument("--write", type=Path, help="update this Markdown file in place (e.g. README.md)")
    args = p.parse_args(argv)
    if args.write:
        write_into(args.write)
    else:
        print(render())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

