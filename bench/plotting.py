"""matplotlib is an optional extra: load it headless, or say how to install it."""

from __future__ import annotations

from types import ModuleType

from detnet.bench.common import BenchError


def pyplot() -> ModuleType:
    """matplotlib.pyplot on the Agg backend."""
    try:
        import matplotlib
    except ImportError as exc:
        raise BenchError("plots need matplotlib: pip install 'detnet[plot]'") from exc
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt
