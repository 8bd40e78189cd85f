"""Which pod a process belongs to, from its ``/proc/PID/cgroup`` text: sans-I/O.

kubelet puts every container of a pod in a cgroup below the pod's own, and names the
pod's cgroup after the pod UID:

- systemd driver: ``.../kubepods.slice/kubepods-burstable.slice/
  kubepods-burstable-pod<uid, '-' as '_'>.slice/cri-containerd-<id>.scope`` (CRI-O:
  ``crio-<id>.scope``, dockershim/cri-dockerd: ``docker-<id>.scope``); the guaranteed
  class has no QoS level (``kubepods-pod<uid>.slice``); a custom ``--cgroup-root`` adds a
  prefix (kind: ``kubelet-kubepods-besteffort-pod<uid>.slice``);
- cgroupfs driver: ``/kubepods/burstable/pod<uid>/<id>`` (guaranteed:
  ``/kubepods/pod<uid>/<id>``; CRI-O: ``crio-<id>``).

Static pods carry their config hash (32 hex digits, no dashes) in that place. On cgroup
v1 every hierarchy has a line (``4:memory:/kubepods/...``, ``1:name=systemd:/...``); on
v2 there is one, ``0::/...``. Paths are relative to the reader's cgroup namespace: from
inside a container they climb out with ``..`` (``0::/../../kubepods-besteffort-pod<uid>
.slice/cri-containerd-<id>.scope``), which hides the levels above the common ancestor —
the QoS level of a cgroupfs path among them (``qos`` is then None).

Only a process in a container's own cgroup counts: it shares the pod's network
namespace. Not CRI-O's ``crio-conmon-<id>`` monitor (it sits in the pod's cgroup but in
the host's network namespace: its interfaces would be the node's), nor a process in a
cgroup nested below a container (a container runtime inside the pod runs its own
network namespaces there). When lines disagree about the pod, the answer is None: an
unknown is better than another pod's numbers.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

MAX_CGROUP_BYTES = 64 * 1024  # a /proc/PID/cgroup file is a few hundred bytes

QOS_BY_LEVEL = {"": "Guaranteed", "burstable": "Burstable", "besteffort": "BestEffort"}

_UUID_SYSTEMD = r"[0-9a-fA-F]{8}(?:_[0-9a-fA-F]{4}){3}_[0-9a-fA-F]{12}"
_UUID = r"[0-9a-fA-F]{8}(?:-[0-9a-fA-F]{4}){3}-[0-9a-fA-F]{12}"
_HASH = r"[0-9a-fA-F]{32}"  # a static pod's UID: the hash of its manifest
# A systemd slice unit name: [prefix-]kubepods[-qos]-pod<uid>.slice
_POD_SLICE = re.compile(
    rf"(?:[A-Za-z0-9_.:\\]+-)?kubepods(?:-(burstable|besteffort))?-pod({_UUID_SYSTEMD}|{_HASH})\.slice"
)
_POD_DIR = re.compile(rf"pod({_UUID}|{_HASH})")
_SCOPE = re.compile(r"([A-Za-z0-9_.:-]+?)-([0-9a-fA-F]{16,128})\.scope")
_BARE_ID = re.compile(r"(?:([a-z][a-z0-9-]*?)-)?([0-9a-fA-F]{16,128})")
_CONMON = "crio-conmon"


@dataclass(frozen=True)
class PodCgroup:
    """The pod (and container) a cgroup path names.

    ``uid`` is lower-case with dashes (the API's ``metadata.uid``, or a static pod's
    config hash); ``qos`` is the API's ``status.qosClass`` spelling, None when the path
    hides it; ``driver`` is ``systemd`` or ``cgroupfs``; ``container`` the runtime's
    container id."""

    uid: str
    qos: str | None
    driver: str
    container: str


def pod_of_path(path: str) -> PodCgroup | None:
    """The pod and container of one cgroup path; None when it is not a container's
    own cgroup in a kubelet pod (see the module docstring)."""
    parts = [p for p in path.strip().split("/") if p]
    for i, part in enumerate(parts):
        if "pod" not in part:
            continue
        if m := _POD_SLICE.fullmatch(part):
            level, uid, driver = m.group(1) or "", m.group(2).replace("_", "-"), "systemd"
            qos: str | None = QOS_BY_LEVEL[level]
        elif m := _POD_DIR.fullmatch(part):
            uid, driver = m.group(1), "cgroupfs"
            parent = parts[i - 1] if i > 0 else ".."
            if parent in ("burstable", "besteffort"):
                qos = QOS_BY_LEVEL[parent]
            elif parent == "kubepods":
                qos = QOS_BY_LEVEL[""]
            elif parent == "..":
                qos = None  # above the reader's cgroup namespace: not visible
            else:
                continue  # some other directory that happens to be called pod<hex>
        else:
            continue
        # Exactly one level below the pod: a container's own cgroup.
        if len(parts) != i + 2:
            return None
        container = _container_id(parts[i + 1], systemd=driver == "systemd")
        if container is None:
            return None
        return PodCgroup(uid=uid.lower(), qos=qos, driver=driver, container=container)
    return None


def _container_id(part: str, *, systemd: bool) -> str | None:
    if part == "..":
        return None
    if systemd:
        m = _SCOPE.fullmatch(part)
        if m is None or m.group(1) == _CONMON:
            return None
        return m.group(2).lower()
    m = _BARE_ID.fullmatch(part)
    if m is None or m.group(1) == _CONMON:
        return None
    return m.group(2).lower()


def parse_proc_cgroup(text: str) -> PodCgroup | None:
    """The pod of a process from its ``/proc/PID/cgroup`` (v1: one line per hierarchy;
    v2: ``0::PATH``); None when no line names a container of a pod, or when lines
    name different pods or containers."""
    found: PodCgroup | None = None
    for line in text[:MAX_CGROUP_BYTES].splitlines():
        # hierarchy-ID:controller-list:cgroup-path (the path may itself contain ':')
        ident, sep, rest = line.partition(":")
        if not sep or not ident.isdigit():
            continue
        _controllers, sep, path = rest.partition(":")
        if not sep or not path.startswith("/"):
            continue
        pod = pod_of_path(path)
        if pod is None:
            continue
        if found is not None and (pod.uid, pod.container) != (found.uid, found.container):
            return None
        if found is None or (found.qos is None and pod.qos is not None):
            found = pod
    return found
