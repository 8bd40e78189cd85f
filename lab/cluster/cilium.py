"""A stand-in for Cilium's bandwidth manager on one lab node:
``python -m detnet.lab.cluster.cilium --node NODE --kubeconfig FILE --endpoints FILE``.

What it does, as Cilium's agent does it (the version docs/deploy.md targets, 1.15+):

- it watches the pods of its node through the API server (list, then watch from the
  list's resourceVersion with ``fieldSelector=spec.nodeName=NODE``, resuming after a
  dropped connection and re-listing on 410 Gone), as the agent's pod watcher does;
- on every pod update whose ``kubernetes.io/egress-bandwidth`` changed (and for every
  pod at the first list, as an agent restoring its endpoints does) it applies the value
  to that pod's egress at once, with no pod restart (``UpdateBandwidthPolicy`` on the
  endpoint, one event queue per endpoint: changes of one pod apply in order);
- the value is a quantity in bit/s (``quantity.py``: ``"80M"`` is 80 Mbit/s); a value
  it cannot parse removes the limit, as does an absent one or 0.

Each change is one JSON line (stdout, or ``--log FILE``): ``{"event": "bandwidth",
"node", "namespace", "pod", "uid", "value", "rate_bytes_per_s" (null: no limit),
"action": "set"|"remove", "reason", "seen", "applied"}`` with ``seen`` the wall-clock
time the watch event arrived and ``applied`` when the rate was on the pod's interface,
so the lab can measure from the controller's decision to the rate on the wire. A
``{"event": "ready"}`` line follows the first list.

Where it differs from Cilium (docs/lab.md says the same):

- Cilium paces each endpoint with EDT (an eBPF program stamps departure times, the
  ``fq`` qdisc on the node's native device holds packets until then); this kernel has no
  ``fq``, and the lab's pods have their own veth, so the stand-in puts a ``tbf`` of the
  rate on the pod's own ``eth0`` (``tc`` from iproute2 run in the pod's namespace: a
  stand-in needs the obviously right qdisc more than Cilium's microsecond map update; the
  few milliseconds ``tc`` takes, twice since it reads the present tbf first
  (``lab.topology.tbf_command``: a bucket that shrinks takes a fresh tbf), are inside the
  measured latency). Both hold the pod's excess in the pod's own queue and give its TCP
  back-pressure.
- Cilium shapes only traffic leaving through the native device: same-node pod-to-pod
  traffic is not shaped. The pod's ``eth0`` carries that traffic too, so the stand-in
  shapes it (the lab sends no best-effort traffic between pods of one node).
- ``kubernetes.io/ingress-bandwidth`` is ignored, as by Cilium's bandwidth manager
  without its ingress option; ``bandwidth.cilium.io/priority`` is not modelled.
- Which pod is which network namespace: Cilium learns it from its CNI plugin at pod
  creation; the stand-in reads ``--endpoints``, a JSON map ``{"NAMESPACE/POD": {"netns":
  NAME, "device": "eth0"}}`` that the lab (playing kubelet and CNI) writes, re-read
  when it changes.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import signal
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import IO, Any
from urllib.parse import quote

import yaml

from detnet.lab.cluster.quantity import egress_limit
from detnet.lab.topology import root_tbf, show_tbf_command, tbf_command

EGRESS_ANNOTATION = "kubernetes.io/egress-bandwidth"
POD_BUFFER_MS = 20.0  # the pod's own queue; its TCP senders are held back by TSQ anyway
MAX_KUBECONFIG_BYTES = 1 << 20
MAX_ENDPOINTS_BYTES = 1 << 20
MAX_LINE_BYTES = 4 << 20  # one watch event: a pod object is a few kB
WATCH_TIMEOUT_S = 300  # the server ends the watch then; we resume from the last version
INACTIVITY_S = 90.0  # no event nor bookmark for this long: the connection is dead
_BACKOFF = (0.2, 0.5, 1.0, 2.0, 5.0)

JsonObj = dict[str, Any]


class StandInError(Exception):
    """A bad argument or an unusable kubeconfig: one line for the user."""


class _Gone(Exception):
    """The watch's resourceVersion is too old (410): list again."""


# ------------------------------------------------------------------- the reducer


@dataclass(frozen=True)
class Change:
    """A pod whose egress annotation must be (re)applied."""

    namespace: str
    name: str
    uid: str
    value: str | None  # the annotation, None when absent
    seen: float  # wall clock


def _meta(obj: Mapping[str, Any]) -> Mapping[str, Any]:
    meta = obj.get("metadata")
    return meta if isinstance(meta, Mapping) else {}


def _annotation(obj: Mapping[str, Any]) -> str | None:
    annotations = _meta(obj).get("annotations")
    if not isinstance(annotations, Mapping):
        return None
    value = annotations.get(EGRESS_ANNOTATION)
    return value if isinstance(value, str) else None


class BandwidthPolicies:
    """The egress annotation of each pod of one node as last applied; turns the pod
    watch's lists and events into ``Change``s (sans-I/O: ``now`` is given)."""

    def __init__(self, node: str) -> None:
        self.node = node
        self._applied: dict[tuple[str, str], tuple[str, str | None]] = {}  # key -> (uid, value)

    def _ours(self, obj: Mapping[str, Any]) -> bool:
        spec = obj.get("spec")
        spec = spec if isinstance(spec, Mapping) else {}
        # The field selector already says so; a pod of another node is never ours. Cilium
        # manages no endpoint for a hostNetwork pod.
        return spec.get("nodeName") == self.node and not spec.get("hostNetwork")

    def _key(self, obj: Mapping[str, Any]) -> tuple[str, str] | None:
        meta = _meta(obj)
        ns, name = meta.get("namespace"), meta.get("name")
        if not isinstance(ns, str) or not isinstance(name, str) or not ns or not name:
            return None
        return ns, name

    def _update(self, obj: Mapping[str, Any], now: float) -> Change | None:
        key = self._key(obj)
        if key is None or not self._ours(obj):
            if key is not None:
                self._applied.pop(key, None)
            return None
        uid = str(_meta(obj).get("uid") or "")
        value = _annotation(obj)
        if self._applied.get(key) == (uid, value):
            return None  # an update that did not touch the annotation: nothing to do
        self._applied[key] = (uid, value)
        return Change(namespace=key[0], name=key[1], uid=uid, value=value, seen=now)

    def on_list(self, items: Sequence[Mapping[str, Any]], *, now: float) -> list[Change]:
        """A (re-)list: changes for every pod whose value differs from what was applied
        (every pod, the first time); pods no longer listed are forgotten."""
        listed = {k for k in (self._key(o) for o in items) if k is not None}
        for key in [k for k in self._applied if k not in listed]:
            del self._applied[key]
        changes = []
        for obj in items:
            change = self._update(obj, now)  # at the first list: every pod (a restore)
            if change is not None:
                changes.append(change)
        return changes

    def on_event(self, kind: str, obj: Mapping[str, Any], *, now: float) -> list[Change]:
        """One watch event (ADDED, MODIFIED, DELETED)."""
        key = self._key(obj)
        if key is None:
            return []
        if kind == "DELETED":
            self._applied.pop(key, None)  # the endpoint goes with the pod
            return []
        if kind in ("ADDED", "MODIFIED"):
            change = self._update(obj, now)
            return [] if change is None else [change]
        return []


# -------------------------------------------------------------------- the datapath


@dataclass(frozen=True)
class Endpoint:
    """Where a pod's egress is shaped."""

    netns: str
    device: str


class Endpoints:
    """The ``--endpoints`` map, re-read when the file changes."""

    def __init__(self, path: str) -> None:
        self.path = path
        self._stamp: tuple[int, int, int] | None = None
        self._map: dict[str, Endpoint] = {}

    def get(self, namespace: str, name: str) -> Endpoint | None:
        """The endpoint of a pod (reading the file again if it changed)."""
        try:
            st = os.stat(self.path)
        except OSError:
            return self._map.get(f"{namespace}/{name}")
        stamp = (st.st_ino, st.st_size, st.st_mtime_ns)
        if stamp != self._stamp:
            self._map = read_endpoints(self.path)
            self._stamp = stamp
        return self._map.get(f"{namespace}/{name}")


def read_endpoints(path: str) -> dict[str, Endpoint]:
    """Parse an endpoints file; StandInError when it is not one."""
    try:
        with open(path, "rb") as f:
            data = f.read(MAX_ENDPOINTS_BYTES + 1)
    except OSError as exc:
        raise StandInError(f"--endpoints {path}: {exc.strerror or exc}") from exc
    if len(data) > MAX_ENDPOINTS_BYTES:
        raise StandInError(f"--endpoints {path}: larger than {MAX_ENDPOINTS_BYTES} bytes")
    try:
        doc = json.loads(data)
    except ValueError as exc:
        raise StandInError(f"--endpoints {path}: not JSON ({exc})") from exc
    if not isinstance(doc, dict):
        raise StandInError(f"--endpoints {path}: must be a JSON object")
    out = {}
    for key, ep in doc.items():
        if not isinstance(ep, dict) or not isinstance(ep.get("netns"), str):
            raise StandInError(f"--endpoints {path}: {key!r} needs a netns name")
        netns, device = ep["netns"], ep.get("device", "eth0")
        if not isinstance(device, str) or "/" in netns or netns in ("", ".", ".."):
            raise StandInError(f"--endpoints {path}: {key!r}: bad netns or device")
        out[str(key)] = Endpoint(netns=netns, device=device)
    return out


async def _tc(argv: Sequence[str]) -> tuple[int, str, str]:
    proc = await asyncio.create_subprocess_exec(
        *argv, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
    )
    out, err = await proc.communicate()
    return proc.returncode or 0, out.decode(errors="replace"), err.decode(errors="replace").strip()


async def set_egress(ep: Endpoint, bytes_per_s: int | None) -> str | None:
    """Put ``bytes_per_s`` on the endpoint's egress (None: remove any limit); returns an
    error message, or None."""
    if bytes_per_s is None:
        code, _, err = await _tc(["tc", "-n", ep.netns, "qdisc", "del", "dev", ep.device, "root"])
        # No qdisc of ours there (never limited): already the state we want.
        if code != 0 and "No such file" not in err and "Cannot delete qdisc" not in err:
            return err or f"tc exited {code}"
        return None
    code, shown, _ = await _tc(show_tbf_command(ep.netns, ep.device))
    command = tbf_command(
        ep.netns,
        ep.device,
        rate_mbps=bytes_per_s * 8 / 1e6,
        buffer_ms=POD_BUFFER_MS,
        present=root_tbf(shown) if code == 0 else None,
    )
    code, _, err = await _tc(command)
    return None if code == 0 else (err or f"tc exited {code}")


class StandIn:
    """The agent: the pod watch feeding ``BandwidthPolicies``, changes applied per pod in
    order, each written as a JSON line to ``out``."""

    def __init__(
        self,
        *,
        node: str,
        server: str,
        token: str,
        endpoints: Endpoints,
        out: IO[str],
        apply: Callable[[Endpoint, int | None], Any] = set_egress,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.node = node
        self.server = server.rstrip("/")
        self.token = token
        self.endpoints = endpoints
        self.out = out
        self.policies = BandwidthPolicies(node)
        self._apply = apply
        self._clock = clock
        self._locks: dict[tuple[str, str], asyncio.Lock] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self.ready = asyncio.Event()

    def _write(self, record: JsonObj) -> None:
        self.out.write(json.dumps(record, separators=(",", ":")) + "\n")
        self.out.flush()

    def _dispatch(self, changes: Sequence[Change]) -> None:
        for change in changes:
            task = asyncio.create_task(self._handle(change))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _handle(self, change: Change) -> None:
        key = (change.namespace, change.name)
        lock = self._locks.setdefault(key, asyncio.Lock())
        async with lock:  # FIFO: one pod's changes apply in the order they were seen
            limit = egress_limit(change.value)
            record: JsonObj = {
                "event": "bandwidth",
                "node": self.node,
                "namespace": change.namespace,
                "pod": change.name,
                "uid": change.uid,
                "value": change.value,
                "rate_bytes_per_s": limit.bytes_per_s,
                "action": "set" if limit.bytes_per_s is not None else "remove",
                "reason": limit.reason,
                "seen": round(change.seen, 6),
            }
            ep = self.endpoints.get(change.namespace, change.name)
            if ep is None:
                record["error"] = "no endpoint for this pod on this node"
            else:
                error = await self._apply(ep, limit.bytes_per_s)
                if error:
                    record["error"] = error
            record["applied"] = round(self._clock(), 6)
            self._write(record)

    async def drain(self) -> None:
        """Wait for every change in flight."""
        while self._tasks:
            await asyncio.gather(*list(self._tasks), return_exceptions=True)

    # ---------------------------------------------------------------- the watch

    def _url(self, **params: str) -> str:
        query = {"fieldSelector": f"spec.nodeName={self.node}", **params}
        return f"{self.server}/api/v1/pods?" + "&".join(
            f"{k}={quote(v, safe='')}" for k, v in query.items()
        )

    async def run(self, stop: asyncio.Event) -> None:
        """List and watch until ``stop`` is set."""
        import aiohttp

        headers = {
            "Authorization": f"Bearer {self.token}",
            "User-Agent": f"cilium-standin/{self.node}",
        }
        timeout = aiohttp.ClientTimeout(total=None, connect=5.0, sock_read=INACTIVITY_S)
        async with aiohttp.ClientSession(headers=headers, timeout=timeout, trust_env=False) as http:
            rv: str | None = None
            failures = 0
            while not stop.is_set():
                try:
                    if rv is None:
                        rv = await self._list(http)
                    rv = await self._watch(http, rv, stop)
                    failures = 0
                except _Gone:
                    self._write({"event": "relist", "node": self.node, "ts": self._clock()})
                    rv = None
                except (aiohttp.ClientError, TimeoutError, ValueError) as exc:
                    self._write(
                        {"event": "watch_error", "node": self.node, "ts": self._clock(),
                         "error": f"{type(exc).__name__}: {exc}"[:500]}
                    )  # fmt: skip
                    delay = _BACKOFF[min(failures, len(_BACKOFF) - 1)]
                    failures += 1
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(stop.wait(), delay)
            await self.drain()

    async def _list(self, http: Any) -> str:
        async with http.get(self._url()) as resp:
            if resp.status != 200:
                raise ValueError(f"list pods: HTTP {resp.status}")
            doc = await resp.json(content_type=None)
        items = doc.get("items") if isinstance(doc, dict) else None
        if not isinstance(items, list):
            raise ValueError("list pods: no items in the answer")
        self._dispatch(self.policies.on_list(items, now=self._clock()))
        if not self.ready.is_set():
            await self.drain()
            self.ready.set()
            self._write({"event": "ready", "node": self.node, "ts": self._clock()})
        return str(_meta(doc).get("resourceVersion") or "0")

    async def _watch(self, http: Any, rv: str, stop: asyncio.Event) -> str:
        url = self._url(
            watch="true",
            resourceVersion=rv,
            allowWatchBookmarks="true",
            timeoutSeconds=str(WATCH_TIMEOUT_S),
        )
        async with http.get(url) as resp:
            if resp.status == 410:
                raise _Gone
            if resp.status != 200:
                raise ValueError(f"watch pods: HTTP {resp.status}")
            stopper = asyncio.create_task(stop.wait())
            try:
                while True:
                    reader = asyncio.create_task(resp.content.readline())
                    done, _ = await asyncio.wait(
                        {reader, stopper}, return_when=asyncio.FIRST_COMPLETED
                    )
                    if reader not in done:
                        reader.cancel()
                        with contextlib.suppress(asyncio.CancelledError, Exception):
                            await reader
                        return rv
                    line = reader.result()
                    if not line:
                        return rv  # the server ended the watch: resume from rv
                    if len(line) > MAX_LINE_BYTES:
                        raise ValueError("watch event larger than the bound")
                    rv = self._event(line, rv)
            finally:
                stopper.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await stopper

    def _event(self, line: bytes, rv: str) -> str:
        now = self._clock()
        try:
            ev = json.loads(line)
        except ValueError:
            return rv  # a torn line: the next list or event repairs the state
        if not isinstance(ev, dict) or not isinstance(ev.get("object"), dict):
            return rv
        kind, obj = ev.get("type"), ev["object"]
        if kind == "ERROR":
            if obj.get("code") == 410:
                raise _Gone
            raise ValueError(f"watch error: {str(obj.get('message'))[:200]}")
        new_rv = _meta(obj).get("resourceVersion")
        if kind != "BOOKMARK" and isinstance(kind, str):
            self._dispatch(self.policies.on_event(kind, obj, now=now))
        return str(new_rv) if new_rv else rv


# ------------------------------------------------------------------------- CLI


def read_kubeconfig(path: str) -> tuple[str, str]:
    """(server URL, bearer token) of the kubeconfig's current context."""
    try:
        with open(path, "rb") as f:
            data = f.read(MAX_KUBECONFIG_BYTES + 1)
    except OSError as exc:
        raise StandInError(f"--kubeconfig {path}: {exc.strerror or exc}") from exc
    if len(data) > MAX_KUBECONFIG_BYTES:
        raise StandInError(f"--kubeconfig {path}: larger than {MAX_KUBECONFIG_BYTES} bytes")
    try:
        doc = yaml.safe_load(data)
        ctx_name = doc["current-context"]
        ctx = next(c["context"] for c in doc["contexts"] if c["name"] == ctx_name)
        cluster = next(c["cluster"] for c in doc["clusters"] if c["name"] == ctx["cluster"])
        user = next(u["user"] for u in doc["users"] if u["name"] == ctx["user"])
        server, token = str(cluster["server"]), str(user.get("token") or "")
    except (yaml.YAMLError, KeyError, TypeError, StopIteration) as exc:
        raise StandInError(f"--kubeconfig {path}: not a usable kubeconfig ({exc!r})") from exc
    if not server.startswith(("http://", "https://")):
        raise StandInError(f"--kubeconfig {path}: server {server!r} is not an http(s) URL")
    return server, token


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m detnet.lab.cluster.cilium",
        description="Apply kubernetes.io/egress-bandwidth of this node's pods as Cilium does.",
    )
    p.add_argument("--node", required=True)
    p.add_argument("--kubeconfig", required=True, metavar="FILE")
    p.add_argument("--endpoints", required=True, metavar="FILE", help="NAMESPACE/POD -> netns")
    p.add_argument("--log", metavar="FILE", help="JSON lines here (default stdout)")
    return p


async def _main(args: argparse.Namespace, out: IO[str]) -> int:
    server, token = read_kubeconfig(args.kubeconfig)
    read_endpoints(args.endpoints)  # a bad file is an error now, not at the first change
    stand_in = StandIn(
        node=args.node, server=server, token=token, endpoints=Endpoints(args.endpoints), out=out
    )
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stand_in.run(stop)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point; a bad argument is one line on stderr and exit status 2."""
    args = _parser().parse_args(argv)
    out: IO[str] = sys.stdout
    try:
        if args.log:
            try:
                out = open(args.log, "a", encoding="utf-8")  # noqa: SIM115 - closed below
            except OSError as exc:
                raise StandInError(f"--log {args.log}: {exc.strerror or exc}") from exc
        return asyncio.run(_main(args, out))
    except StandInError as exc:
        print(f"cilium stand-in: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    finally:
        if out is not sys.stdout:
            out.close()


if __name__ == "__main__":
    sys.exit(main())
