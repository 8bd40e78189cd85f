"""Service names to addresses, for the config's users (``control``, ``config check
--resolve``): the parser never touches DNS, so a file checks the same on any machine.

Errors name the line of the app's ``service`` (or ``host``), as every config error does.
"""

from __future__ import annotations

import ipaddress
import socket
from collections.abc import Collection
from dataclasses import replace

from detnet.controller.config.model import Config, CriticalApp
from detnet.controller.errors import ConfigError
from detnet.engine.parse import escape, show
from detnet.engine.targets import Target


def resolve_targets(config: Config, *, skip: Collection[str] = ()) -> list[Target]:
    """``config.targets()`` with every host name looked up (getaddrinfo, first answer),
    but for the apps named in ``skip`` (probed by endpoint: nothing to resolve).

    Raises ConfigError ``FILE:LINE: critical_apps[i].service: cannot resolve ...``."""
    return [
        replace(target, host=_address(config, app, i))
        for i, (app, target) in enumerate(zip(config.critical_apps, config.targets(), strict=True))
        if app.name not in skip
    ]


def _address(config: Config, app: CriticalApp, index: int) -> str:
    try:
        return str(ipaddress.ip_address(app.address))
    except ValueError:
        pass
    kind = socket.SOCK_STREAM if app.protocol == "tcp" else socket.SOCK_DGRAM
    try:
        infos = socket.getaddrinfo(app.address, app.port or None, type=kind)
    except (socket.gaierror, UnicodeError) as exc:
        where = config.where(f"critical_apps[{index}].{'host' if app.host else 'service'}")
        raise ConfigError(
            f"{where}: cannot resolve {show(app.address, limit=253)}: {escape(str(exc))}"
        ) from exc
    return str(infos[0][4][0])
