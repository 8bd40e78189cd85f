"""`detnet` itself: the command table in --help, --version, unknown commands."""

from __future__ import annotations

import os
import subprocess
from importlib.metadata import version

import pytest

from detnet.controller import cli
from tests.helpers import DETNET


def detnet(*argv: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*DETNET, *argv], capture_output=True, text=True, timeout=60, check=False, env=env
    )


def test_help_lists_every_command_with_its_line() -> None:
    done = detnet("--help")
    assert done.returncode == 0
    listed = " ".join(done.stdout.split())  # argparse wraps the lines
    for name, command in cli.COMMANDS.items():
        assert f"{name} {command.help}" in listed
    assert "--version" in listed


@pytest.mark.parametrize("backend", ["cython", "python"])
def test_version_is_the_installed_packages_with_the_native_backend(backend: str) -> None:
    env = dict(os.environ)
    env.pop("DETNET_NO_EXTENSIONS", None)
    if backend == "python":
        env["DETNET_NO_EXTENSIONS"] = "1"
    done = detnet("--version", env=env)
    assert done.returncode == 0
    assert done.stdout == f"detnet {version('detnet')} (native backend: {backend})\n"
    assert done.stderr == ""


# The fewest arguments each command's parser accepts (nothing runs here).
MINIMAL = {
    "reflect": [],
    "probe": [],
    "control": ["--config", "c.yaml"],
    "agent": [],
    "config": ["check", "c.yaml"],
    "lab": [],
    "bench": ["stats"],
}


@pytest.mark.parametrize("name", sorted(MINIMAL))
def test_every_command_module_registers_its_command(name: str) -> None:
    assert set(MINIMAL) == set(cli.COMMANDS)
    args = cli.build_parser(name).parse_args([name, *MINIMAL[name]])
    assert args.command == name
    assert callable(args.func)


def test_an_unknown_command_is_a_usage_error() -> None:
    done = detnet("frobnicate")
    assert done.returncode == 2
    assert "invalid choice: 'frobnicate'" in done.stderr
    assert "Traceback" not in done.stderr
