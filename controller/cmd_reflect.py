"""`detnet reflect` (placeholder while the command is being written)."""

import argparse


def register(sub: "argparse._SubParsersAction[argparse.ArgumentParser]") -> None:
    """Add the `reflect` subcommand."""
    p = sub.add_parser("reflect", help="(not yet written)")
    p.set_defaults(func=lambda args: 1)
