"""The emulation's one error, ``ApiError``, and the Kubernetes ``Status`` body the server
answers it with: code, reason and message in the shape clients parse."""

from __future__ import annotations

from typing import Any

# The reasons the real API server puts beside each code (metav1.StatusReason).
_REASONS = {
    400: "BadRequest",
    401: "Unauthorized",
    403: "Forbidden",
    404: "NotFound",
    405: "MethodNotAllowed",
    409: "Conflict",
    410: "Expired",
    415: "UnsupportedMediaType",
    422: "Invalid",
    429: "TooManyRequests",
    500: "InternalError",
    503: "ServiceUnavailable",
}


class ApiError(Exception):
    """An API error the emulator turns into a Status response."""

    def __init__(self, code: int, message: str, *, name: str = "", kind: str = "") -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.name = name
        self.kind = kind


def status_body(code: int, message: str, *, name: str = "", kind: str = "") -> dict[str, Any]:
    """A Kubernetes ``Status`` failure object."""
    return {
        "kind": "Status",
        "apiVersion": "v1",
        "metadata": {},
        "status": "Failure",
        "message": message,
        "reason": _REASONS.get(code, "Unknown"),
        "details": {"name": name, "kind": kind},
        "code": code,
    }
