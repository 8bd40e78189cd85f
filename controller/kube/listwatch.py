"""List-then-watch of one collection, the way client-go's reflector and kopf do it, for
every cache we keep of API objects (the enforcer's pods today; the agent's pods of its
node and the controller's EndpointSlices next).

``ListWatch.run(sink)`` lists (``sink.on_list(items)``), then watches from the list's
resourceVersion, handing each ADDED/MODIFIED/DELETED to ``sink.on_event`` and moving the
resourceVersion on with every event and BOOKMARK. A watch request ends after
``watch_timeout_s`` (the server closes it; ``sink.on_watch_end()``) and is reopened from
the last resourceVersion. On a dropped connection, an inactivity timeout (no line for
``inactivity_timeout_s``: bookmarks arrive well within it), a 5xx or a 429 it backs off
and resumes from the last resourceVersion as well; on 410 Gone (as an HTTP status or an
ERROR event: the history is compacted) it re-lists at once; on any other failure it
backs off and re-lists. Every ``resync_s`` it re-lists anyway. It runs until cancelled.

The sink's methods are plain functions (reducers such as ``enforce/podwatch.py``): they
must not block; work they start is theirs to track.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, Protocol

import aiohttp
from aiohttp.http_exceptions import HttpProcessingError
from kubernetes_asyncio.client.exceptions import ApiException

from detnet.controller.errors import EnforcementError
from detnet.controller.kube.api import KubeClient
from detnet.controller.kube.objects import JsonObj, WatchEvent, parse_watch_event
from detnet.controller.retry import RETRYABLE, Gone, KubernetesApiError

log = logging.getLogger(__name__)

_MAX_BACKOFF_STEP = 10  # RetryPolicy.backoff(10) is already at its cap


class WatchSink(Protocol):
    """What a ``ListWatch`` feeds."""

    def on_list(self, items: list[JsonObj]) -> None:
        """A (re-)list: ``items`` is the whole collection now; replace what you hold."""
        ...

    def on_event(self, event: WatchEvent) -> None:
        """One ADDED, MODIFIED or DELETED event, in resourceVersion order."""
        ...

    def on_watch_end(self) -> None:
        """A watch request ended cleanly (about every ``watch_timeout_s``): a point to
        resync from what you hold (e.g. retry what failed)."""
        ...


class ListWatch:
    """List, then watch, one collection (see the module docstring).

    ``list_call`` is the generated client's list method bound to ``kube.api_client``
    (e.g. ``CoreV1Api(api).list_namespaced_pod``), called with ``*args`` (e.g. the
    namespace) and the selectors, once plainly and once with ``watch=True``; ``what``
    names the collection in messages (e.g. "pods be -l app=web")."""

    def __init__(
        self,
        *,
        kube: KubeClient,
        list_call: Callable[..., Awaitable[Any]],
        args: Sequence[Any] = (),
        what: str,
        label_selector: str | None = None,
        field_selector: str | None = None,
        watch_timeout_s: int = 60,
        inactivity_timeout_s: float = 90.0,
        resync_s: float = 300.0,
        request_timeout_s: float = 10.0,
    ) -> None:
        if watch_timeout_s < 1 or not inactivity_timeout_s > 0 or not resync_s > 0:
            raise ValueError(
                "need watch_timeout_s >= 1, inactivity_timeout_s > 0 and resync_s > 0, got "
                f"{watch_timeout_s}, {inactivity_timeout_s}, {resync_s}"
            )
        self._kube = kube
        self._list_call, self._args = list_call, tuple(args)
        self.what = what
        self._selectors: dict[str, str] = {}
        if label_selector:
            self._selectors["label_selector"] = label_selector
        if field_selector:
            self._selectors["field_selector"] = field_selector
        self._watch_timeout_s = watch_timeout_s
        self._inactivity_s = inactivity_timeout_s
        self._resync_s = resync_s
        self._timeout = aiohttp.ClientTimeout(total=request_timeout_s)
        self._rv: str | None = None  # None: (re-)list before the next watch
        self._progressed = False

    @property
    def resource_version(self) -> str | None:
        """The last resourceVersion seen (the next watch starts there); None when the
        next step is a (re-)list."""
        return self._rv

    async def list(self) -> tuple[list[JsonObj], str]:
        """List the collection (limiter, retries): its items and resourceVersion."""
        what = f"list {self.what}"
        listing = await self._kube.call(
            what,
            lambda: self._list_call(
                *self._args,
                **self._selectors,
                _preload_content=False,
                _request_timeout=self._timeout,
            ),
        )
        items = listing.get("items") or []
        if not isinstance(items, list) or not all(isinstance(i, dict) for i in items):
            raise EnforcementError(f"{what}: the API server sent items that are not objects")
        meta = listing.get("metadata")
        rv = str((meta if isinstance(meta, dict) else {}).get("resourceVersion") or "")
        return items, rv

    async def run(self, sink: WatchSink) -> None:
        """List and watch into ``sink`` until cancelled; never returns otherwise."""
        failures = 0
        relist_at = 0.0
        just_listed = False  # no watch has got anywhere since the last list
        self._rv = None
        while True:
            self._progressed = False
            try:
                if self._rv is None or time.monotonic() >= relist_at:
                    items, rv = await self.list()
                    sink.on_list(items)
                    self._rv, just_listed = rv, True
                    relist_at = time.monotonic() + self._resync_s
                await self._watch_once(sink)
                failures, just_listed = 0, False
                sink.on_watch_end()
                continue
            except Gone:
                log.info("watch of %s expired (410): re-listing", self.what)
                self._rv = None
                if self._progressed or not just_listed:
                    failures = 0
                    continue
                failures += 1  # 410 from the very list's resourceVersion: do not spin
            except KubernetesApiError as exc:
                # Transient (5xx, 429, connection, inactivity): resume from where we were.
                # Anything else (403, ...): re-list, it may be the resourceVersion.
                if not isinstance(exc, RETRYABLE):
                    self._rv = None
                failures = 1 if self._progressed else failures + 1
                log.warning("watch of %s failed: %s", self.what, exc)
            except EnforcementError as exc:
                self._rv = None
                failures = 1 if self._progressed else failures + 1
                log.warning("watch of %s failed: %s", self.what, exc)
            except Exception:
                # A bug must not silently end the watch (the cache would go stale).
                self._rv = None
                failures += 1
                log.exception("watch of %s crashed; restarting it", self.what)
            if self._progressed:
                just_listed = False
            await asyncio.sleep(self._kube.retry.backoff(min(failures, _MAX_BACKOFF_STEP)))

    async def _watch_once(self, sink: WatchSink) -> None:
        """One watch request from ``self._rv``, moving it on with every event."""
        what = f"watch {self.what}"
        resp = await self._kube.stream(
            what,
            lambda: self._list_call(
                *self._args,
                **self._selectors,
                watch=True,
                allow_watch_bookmarks=True,
                resource_version=self._rv,
                timeout_seconds=self._watch_timeout_s,
                _preload_content=False,
                # sock_read is the inactivity timeout: bookmarks arrive well within it.
                _request_timeout=aiohttp.ClientTimeout(
                    sock_connect=self._timeout.total, sock_read=self._inactivity_s
                ),
            ),
        )
        try:
            while line := await self._readline(resp, what):
                if not line.strip():
                    continue
                event = parse_watch_event(line, what=what)
                if event.type == "ERROR":
                    raise self._error_event(event, what)
                self._rv = event.resource_version or self._rv
                self._progressed = True
                if event.type != "BOOKMARK":  # a bookmark only moves the resourceVersion
                    sink.on_event(event)
        finally:
            resp.release()

    async def _readline(self, resp: aiohttp.ClientResponse, what: str) -> bytes:
        """The next line of the stream, b"" at its end; our errors for a broken one."""
        try:
            return await resp.content.readline()
        except (TimeoutError, aiohttp.ClientError, OSError) as exc:
            raise self._kube.failed(exc, what=what) from exc
        except (ValueError, HttpProcessingError) as exc:
            # A line longer than aiohttp's buffer (an edge bound): ValueError or, in newer
            # aiohttp, LineTooLong, which is no ValueError.
            raise EnforcementError(f"{what}: unreadable watch stream ({exc})") from exc

    def _error_event(self, event: WatchEvent, what: str) -> KubernetesApiError:
        status = event.object
        try:
            code = int(status.get("code") or 0)
        except (TypeError, ValueError):
            code = 0
        exc = ApiException(status=code, reason=str(status.get("message", "")))
        exc.body = json.dumps(status).encode()  # classify() reads the message from it
        return self._kube.failed(exc, what=what)
