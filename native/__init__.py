"""detnet.native: the probe hot path (packet codec, timestamped send/receive, reflector).

Two implementations with one API (``_core.pyi``): the Cython extension ``_core`` and the
pure-Python ``_fallback``. ``DETNET_NO_EXTENSIONS=1`` forces the fallback; otherwise the
extension is used when it was built. ``BACKEND`` says which one is loaded (``"cython"``
or ``"python"``). This package imports nothing else of detnet's.
"""

import os
from types import ModuleType
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from detnet.native._core import *  # noqa: F403


def _load() -> tuple[ModuleType, str]:
    if not os.environ.get("DETNET_NO_EXTENSIONS"):
        try:
            from detnet.native import _core

            return _core, "cython"
        except ImportError:
            pass
    from detnet.native import _fallback

    return _fallback, "python"


_impl, BACKEND = _load()
globals().update({name: getattr(_impl, name) for name in _impl.__all__})
__all__ = ["BACKEND", *_impl.__all__]
