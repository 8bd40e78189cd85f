"""Pure-Python fallback of the native core (placeholder until written)."""

__all__: list[str] = ["PacketError"]


class PacketError(ValueError):
    """A datagram that is not a valid detnet probe."""
