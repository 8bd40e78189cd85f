"""Errors the engine raises for bad input; the CLI prints them as one line."""


class EngineError(Exception):
    """Base class of the engine's user-facing errors."""


class TargetError(EngineError, ValueError):
    """A probe target that cannot be parsed, resolved or reached."""
