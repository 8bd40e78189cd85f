cdef int _placeholder = 0
__all__ = ["PacketError"]
class PacketError(ValueError):
    pass
