"""The ``detnet`` command: a table of subcommands, each imported only when it runs.

``COMMANDS`` names each subcommand's module and its line in ``detnet --help``, which
imports none of them. ``detnet NAME ...`` imports that one module; its
``register(subparsers)`` adds the parser and sets ``func`` (parsed arguments -> exit
status), and ``func`` imports what the command needs (the engine, the config, aiohttp,
kubernetes-asyncio) only when it runs. So ``detnet control`` never loads the benchmark
harness or the lab, and ``detnet probe`` never loads the Kubernetes client.

Whatever the command, a ``detnet`` process ends the same ways (``cli.process``):

- a user mistake (one of ``USER_ERRORS``) is one line on stderr, exit status 2;
- SIGINT at any point, imports included, exits 130 without a traceback (a running
  command first stops as on SIGTERM, which exits 0);
- a closed stdout (``detnet probe --stream | head``) ends the command quietly, exit 0.

This module imports only what the interpreter has already loaded at start (not even
``typing``), so that a SIGINT a few milliseconds after start finds ``main`` running.
"""

from __future__ import annotations

# _signal: the interpreter's own half of `signal`, loaded before any of ours. `import
# signal` would build its enums first (about a millisecond, more than the rest of this
# import), time in which a SIGINT ends in a traceback because `main` is not running yet.
import _signal  # type: ignore[import-not-found]  # no typeshed stub
import collections
import importlib
import sys

TYPE_CHECKING = False  # typing.TYPE_CHECKING, without importing typing (mypy knows it)
if TYPE_CHECKING:
    import argparse
    from collections.abc import Sequence
    from typing import Any

DESCRIPTION = "Keep latency-critical traffic deterministic on shared networks."

# A subcommand: the module whose ``register(subparsers)`` adds it, and its line of help.
Command = collections.namedtuple("Command", ["module", "help"])

COMMANDS: dict[str, Command] = {
    "reflect": Command(
        "detnet.controller.cli.reflect",
        "answer UDP probes (fast path) and TCP connect/echo probes",
    ),
    "probe": Command(
        "detnet.controller.cli.probe",
        "probe critical services: RTT, IQR jitter, IPDV, queueing delay, loss",
    ),
    "control": Command(
        "detnet.controller.cli.control",
        "probe critical services and cap best-effort egress (engine + policy + enforcer)",
    ),
    "agent": Command(
        "detnet.controller.agent.cli",
        "serve this node's per-pod network usage to the controller (a DaemonSet)",
    ),
    "config": Command("detnet.controller.cli.config", "check a controller config file"),
    "lab": Command(
        "detnet.controller.cli.lab", "run the closed loop on network namespaces and report"
    ),
    "bench": Command("detnet.controller.cli.bench", "benchmark probe precision and speed"),
}


def version() -> str:
    """``detnet VERSION (native backend: cython|python)``, from the installed package."""
    from importlib.metadata import PackageNotFoundError
    from importlib.metadata import version as package_version

    from detnet import native

    try:
        number = package_version("detnet")
    except PackageNotFoundError:
        number = "unknown (not installed)"
    return f"detnet {number} (native backend: {native.BACKEND})"


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """``detnet``'s parser, with the full parser of ``command`` only (None: of none)."""
    import argparse

    class VersionAction(argparse.Action):
        # Not action="version": that would load the native backend for every parser.
        def __call__(self, parser: argparse.ArgumentParser, *_: Any) -> None:
            print(version())
            parser.exit()

    parser = argparse.ArgumentParser(prog="detnet", description=DESCRIPTION)
    parser.add_argument(
        "--version",
        action=VersionAction,
        nargs=0,
        help="print detnet's version and native backend, then exit",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, cmd in COMMANDS.items():
        if name == command:
            importlib.import_module(cmd.module).register(sub)
        else:
            sub.add_parser(name, help=cmd.help)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``detnet`` with ``argv`` (default: the process's arguments); the exit status.

    Called as the process's entry point (``argv`` None), it ignores SIGINT once the
    command is done, so that the interpreter's shutdown cannot be interrupted into a
    traceback; called with ``argv`` (tests) it leaves the signal handlers as they were.
    """
    try:
        return _run(sys.argv[1:] if argv is None else list(argv))
    except KeyboardInterrupt:
        if argv is None:
            _signal.signal(_signal.SIGINT, _signal.SIG_IGN)
        return 130
    except BrokenPipeError:
        from detnet.controller.cli.process import stdout_closed

        stdout_closed()
        return 0
    finally:
        if argv is None:
            _signal.signal(_signal.SIGINT, _signal.SIG_IGN)


def _run(argv: list[str]) -> int:
    # The top level has no options but --help and --version: the command comes first.
    command = argv[0] if argv and argv[0] in COMMANDS else None
    args = build_parser(command).parse_args(argv)
    from detnet.controller.errors import USER_ERRORS

    try:
        return int(args.func(args))
    except USER_ERRORS as exc:
        print(f"detnet {args.command}: error: {exc}", file=sys.stderr)
        return 2
