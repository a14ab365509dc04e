"""What every command does around its work: logging, the config (with --root), one-line errors, a JSON summary."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Callable

from core.config import AppConfig, ConfigError, load_config


class Incomplete(Exception):
    """The command did its work and committed it, but part of the input needs the operator (a file no adapter could
    read): the summary still prints, then one line says what; the exit code is 3."""

    def __init__(self, message: str, summary: dict) -> None:
        super().__init__(message)
        self.summary = summary


def run_command(parser: argparse.ArgumentParser, argv: list[str] | None,
                body: Callable[[argparse.Namespace, AppConfig], dict | None],
                errors: tuple[type[BaseException], ...] = ()) -> int:
    """Parse, load --config, run `body`; bad input exits 2 with one line on stderr, a summary prints as JSON."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    args = parser.parse_args(argv)
    try:
        cfg = load_config(args.config)
        if getattr(args, "root", None):
            cfg.data.root = args.root
        summary = body(args, cfg)
    except (ConfigError, *errors) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except Incomplete as err:
        print(json.dumps(err.summary), flush=True)
        print(f"error: {err}", file=sys.stderr)
        return 3
    if summary is not None:
        print(json.dumps(summary), flush=True)
    return 0


def positive(name: str, value: float | None) -> None:
    if value is not None and value <= 0:
        raise ConfigError(f"{name}: must be positive, got {value}")
