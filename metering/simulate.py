"""Placeholder: being written (simulator)."""

from __future__ import annotations

import argparse
from typing import Any


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("mode", nargs="?")


def main(args: Any, settings: Any) -> int:
    raise SystemExit("not yet")


def demo_hook(services: Any) -> None:
    raise RuntimeError("not yet")
