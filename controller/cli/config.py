"""`detnet config check FILE`: validate a config and print the effective one.

Exit 0 and the config as YAML (defaults filled, our own form) on stdout; warnings go to
stderr. A bad file exits 2 with ``FILE:LINE: field: problem`` (the CLI prints it).
"""

from __future__ import annotations

import argparse
import sys

from detnet.controller.cli import COMMANDS


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add the `config` subcommand."""
    p = sub.add_parser("config", description=COMMANDS["config"].help)
    actions = p.add_subparsers(dest="config_command", required=True, metavar="ACTION")
    check = actions.add_parser(
        "check", help="validate FILE and print the effective config (defaults filled)"
    )
    check.add_argument("file", metavar="FILE", help="our YAML, or the prototype's ConfigMap")
    check.add_argument(
        "--resolve",
        action="store_true",
        help="also resolve every service name (as `detnet control` does at start)",
    )
    check.set_defaults(func=run_check)


def run_check(args: argparse.Namespace) -> int:
    """Validate, optionally resolve, and print; ConfigError propagates to the CLI (exit 2)."""
    from detnet.controller.config import load_config, resolve_targets

    cfg = load_config(args.file)
    if args.resolve:
        resolve_targets(cfg)
    for warning in cfg.warnings:
        print(f"detnet config: warning: {warning}", file=sys.stderr)
    sys.stdout.write(cfg.dump())
    return 0
