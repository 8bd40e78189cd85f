"""The controller's error classes, and the set of errors the CLI reports as one line.

Every command module imports this one: it imports nothing heavy (not the native core),
so that ``detnet COMMAND --help`` stays fast.
"""

from __future__ import annotations

from detnet.engine.errors import EngineError


class ControllerError(Exception):
    """Base class of the controller's user-facing errors."""


class ConfigError(ControllerError, ValueError):
    """A config file that cannot be used; the message names the file, field and line."""


class EnforcementError(ControllerError):
    """An enforcer that cannot apply or read limits (API refused, interface missing...)."""


class CommandError(ControllerError):
    """A bad combination of command-line options, or a missing file or permission."""


# Every error a user can cause; anything else is a bug and keeps its traceback. (The
# native core's PacketError is not one: the engine and the reflector catch every one.)
USER_ERRORS: tuple[type[BaseException], ...] = (
    ControllerError,
    EngineError,
    FileNotFoundError,
    PermissionError,
)
