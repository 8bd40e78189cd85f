"""`detnet lab` (placeholder while the command is being written)."""

import argparse


def register(sub: "argparse._SubParsersAction[argparse.ArgumentParser]") -> None:
    """Add the `lab` subcommand."""
    p = sub.add_parser("lab", help="(not yet written)")
    p.set_defaults(func=lambda args: 1)
