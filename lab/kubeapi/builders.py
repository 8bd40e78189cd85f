"""Objects shaped the way a real cluster has them, for tests and the lab to put into the
emulation: pods with the status a kubelet writes (phase, conditions, IPs, container
statuses), nodes, Services, EndpointSlices, and workloads with the names and labels their
controllers give (``web-7c5b4f9d8d`` ReplicaSets with a ``pod-template-hash``, pods owned
through ``ownerReferences``). Pure functions returning plain dicts; the emulator stores them.
"""

from __future__ import annotations

import json
import os
import uuid
from collections.abc import Mapping, Sequence
from typing import Any

from detnet.lab.kubeapi.store import NAME_ALPHABET, JsonObj, now_timestamp

DEFAULT_IMAGE = "registry.local/app:1"
MANAGED_BY_CONTROLLER = "endpointslice-controller.k8s.io"
SERVICE_NAME_LABEL = "kubernetes.io/service-name"
MANAGED_BY_LABEL = "endpointslice.kubernetes.io/managed-by"


def template_hash(template: Any) -> str:
    """A pod template's hash as the Deployment controller spells it: FNV-1a of the
    template, its decimal digits mapped onto the real server's name alphabet."""
    h = 0x811C9DC5
    for byte in json.dumps(template, sort_keys=True).encode():
        h = ((h ^ byte) * 0x01000193) & 0xFFFFFFFF
    return "".join(NAME_ALPHABET[ord(c) % len(NAME_ALPHABET)] for c in str(h))


def owner_reference(obj: Mapping[str, Any], *, controller: bool = True) -> JsonObj:
    """An ``ownerReferences`` item pointing at a stored ``obj``."""
    ref: JsonObj = {
        "apiVersion": obj["apiVersion"],
        "kind": obj["kind"],
        "name": obj["metadata"]["name"],
        "uid": obj["metadata"]["uid"],
    }
    if controller:
        ref |= {"controller": True, "blockOwnerDeletion": True}
    return ref


def _condition(kind: str, ok: bool, *, now: str, reason: str = "") -> JsonObj:
    cond: JsonObj = {
        "type": kind,
        "status": "True" if ok else "False",
        "lastProbeTime": None,
        "lastTransitionTime": now,
    }
    if reason:
        cond["reason"] = reason
    return cond


def pod_status(
    spec: Mapping[str, Any],
    *,
    phase: str,
    ready: bool,
    pod_ip: str = "",
    host_ip: str = "",
    previous: Mapping[str, Any] | None = None,
) -> JsonObj:
    """The status a kubelet reports for a pod of ``spec`` in ``phase``."""
    now = now_timestamp()
    previous = previous or {}
    scheduled = bool(spec.get("nodeName"))
    started = phase in ("Running", "Succeeded", "Failed")
    status: JsonObj = {"phase": phase, "qosClass": previous.get("qosClass", "BestEffort")}
    conditions = [
        _condition("PodScheduled", scheduled, now=now, reason="" if scheduled else "Unschedulable")
    ]
    if started:
        status["startTime"] = previous.get("startTime", now)
        conditions = [
            _condition("PodReadyToStartContainers", phase == "Running", now=now),
            _condition("Initialized", True, now=now),
            _condition("Ready", ready, now=now, reason="" if ready else "ContainersNotReady"),
            _condition(
                "ContainersReady", ready, now=now, reason="" if ready else "ContainersNotReady"
            ),
            *conditions,
        ]
    status["conditions"] = conditions
    if host_ip:
        status["hostIP"], status["hostIPs"] = host_ip, [{"ip": host_ip}]
    if pod_ip:
        status["podIP"], status["podIPs"] = pod_ip, [{"ip": pod_ip}]
    if started:
        old_ids = {
            c.get("name"): c.get("containerID") for c in previous.get("containerStatuses") or []
        }
        statuses = []
        for c in spec.get("containers") or []:
            state: JsonObj
            if phase == "Running":
                state = {"running": {"startedAt": status["startTime"]}}
            else:
                code = 0 if phase == "Succeeded" else 1
                state = {
                    "terminated": {
                        "exitCode": code,
                        "reason": "Completed" if code == 0 else "Error",
                    }
                }
            statuses.append(
                {
                    "name": c["name"],
                    "image": c.get("image", DEFAULT_IMAGE),
                    "imageID": "",
                    "containerID": old_ids.get(c["name"]) or f"containerd://{os.urandom(32).hex()}",
                    "ready": ready and phase == "Running",
                    "started": phase == "Running",
                    "restartCount": 0,
                    "state": state,
                }
            )
        status["containerStatuses"] = statuses
    return status


def pod(
    namespace: str,
    name: str,
    *,
    labels: Mapping[str, str] | None = None,
    annotations: Mapping[str, str] | None = None,
    phase: str = "Running",
    ready: bool | None = None,
    node_name: str = "",
    pod_ip: str = "",
    host_ip: str = "",
    owner_references: Sequence[Mapping[str, Any]] = (),
    containers: Sequence[Mapping[str, Any]] | None = None,
    service_account: str = "default",
) -> JsonObj:
    """A pod as the kubelet reports it (``ready`` defaults to ``phase == "Running"``)."""
    spec: JsonObj = {
        "containers": [dict(c) for c in containers]
        if containers
        else [{"name": "app", "image": DEFAULT_IMAGE}],
        "serviceAccountName": service_account,
    }
    if node_name:
        spec["nodeName"] = node_name
    meta: JsonObj = {
        "name": name,
        "namespace": namespace,
        "labels": dict(labels or {}),
        "annotations": dict(annotations or {}),
    }
    if owner_references:
        meta["ownerReferences"] = [dict(r) for r in owner_references]
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": meta,
        "spec": spec,
        "status": pod_status(
            spec,
            phase=phase,
            ready=phase == "Running" if ready is None else ready,
            pod_ip=pod_ip,
            host_ip=host_ip,
        ),
    }


def node_ready_condition(ready: bool) -> JsonObj:
    """A Node's Ready condition as the kubelet posts it."""
    now = now_timestamp()
    return {
        "type": "Ready",
        "status": "True" if ready else "Unknown",
        "reason": "KubeletReady" if ready else "NodeStatusUnknown",
        "message": "kubelet is posting ready status"
        if ready
        else "Kubelet stopped posting node status.",
        "lastHeartbeatTime": now,
        "lastTransitionTime": now,
    }


def node(
    name: str,
    *,
    internal_ip: str = "",
    labels: Mapping[str, str] | None = None,
    ready: bool = True,
    unschedulable: bool = False,
    pod_cidr: str = "",
) -> JsonObj:
    """A Node as a kubelet registers it."""
    addresses = [{"type": "Hostname", "address": name}]
    if internal_ip:
        addresses.insert(0, {"type": "InternalIP", "address": internal_ip})
    spec: JsonObj = {}
    if unschedulable:
        spec["unschedulable"] = True
    if pod_cidr:
        spec["podCIDR"], spec["podCIDRs"] = pod_cidr, [pod_cidr]
    return {
        "apiVersion": "v1",
        "kind": "Node",
        "metadata": {
            "name": name,
            "labels": {
                "kubernetes.io/hostname": name,
                "kubernetes.io/os": "linux",
                "kubernetes.io/arch": "amd64",
                **(labels or {}),
            },
        },
        "spec": spec,
        "status": {
            "addresses": addresses,
            "conditions": [node_ready_condition(ready)],
            "capacity": {"cpu": "2", "memory": "4Gi", "pods": "110"},
            "allocatable": {"cpu": "2", "memory": "4Gi", "pods": "110"},
            "nodeInfo": {
                "machineID": os.urandom(16).hex(),
                "systemUUID": str(uuid.uuid4()),
                "bootID": str(uuid.uuid4()),
                "kernelVersion": "6.18.0",
                "osImage": "Debian GNU/Linux 13 (trixie)",
                "containerRuntimeVersion": "containerd://2.0.0",
                "kubeletVersion": "v1.32.0",
                "kubeProxyVersion": "v1.32.0",
                "operatingSystem": "linux",
                "architecture": "amd64",
            },
        },
    }


def service_port(port: int | Mapping[str, Any]) -> JsonObj:
    """A Service port from a number or a partial ``{"name", "port", "targetPort",
    "protocol"}`` mapping."""
    if isinstance(port, int):
        return {"port": port, "protocol": "TCP", "targetPort": port}
    return {"protocol": "TCP", "targetPort": port["port"], **port}


def service(
    namespace: str,
    name: str,
    *,
    selector: Mapping[str, str] | None = None,
    ports: Sequence[int | Mapping[str, Any]] = (),
    cluster_ip: str = "",
    type_: str = "ClusterIP",
    labels: Mapping[str, str] | None = None,
    publish_not_ready: bool = False,
) -> JsonObj:
    """A Service (the cluster IP is allocated on the way in unless given)."""
    spec: JsonObj = {"type": type_, "ports": [service_port(p) for p in ports]}
    if selector:
        spec["selector"] = dict(selector)
    if cluster_ip:
        spec["clusterIP"] = cluster_ip
    if publish_not_ready:
        spec["publishNotReadyAddresses"] = True
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": name, "namespace": namespace, "labels": dict(labels or {})},
        "spec": spec,
    }


def endpoint(
    address: str,
    *,
    ready: bool = True,
    serving: bool | None = None,
    terminating: bool = False,
    node_name: str = "",
    zone: str = "",
    target: Mapping[str, Any] | None = None,
) -> JsonObj:
    """One EndpointSlice endpoint; ``target`` is the pod it stands for (a stored pod)."""
    ep: JsonObj = {
        "addresses": [address],
        "conditions": {
            "ready": ready,
            "serving": ready if serving is None else serving,
            "terminating": terminating,
        },
    }
    if node_name:
        ep["nodeName"] = node_name
    if zone:
        ep["zone"] = zone
    if target is not None:
        meta = target["metadata"]
        ep["targetRef"] = {
            "kind": target.get("kind", "Pod"),
            "namespace": meta.get("namespace", ""),
            "name": meta["name"],
            "uid": meta["uid"],
        }
    return ep


def endpoint_slice(
    namespace: str,
    service_name: str,
    *,
    endpoints: Sequence[Mapping[str, Any]],
    ports: Sequence[Mapping[str, Any]] = (),
    address_type: str = "IPv4",
    name: str = "",
    managed_by: str = "detnet-lab",
    owner: Mapping[str, Any] | None = None,
) -> JsonObj:
    """An EndpointSlice of ``service_name`` (``name`` defaults to a generated one)."""
    meta: JsonObj = {
        "namespace": namespace,
        "labels": {SERVICE_NAME_LABEL: service_name, MANAGED_BY_LABEL: managed_by},
    }
    if name:
        meta["name"] = name
    else:
        meta["generateName"] = f"{service_name}-"
    if owner is not None:
        meta["ownerReferences"] = [owner_reference(owner)]
    return {
        "apiVersion": "discovery.k8s.io/v1",
        "kind": "EndpointSlice",
        "metadata": meta,
        "addressType": address_type,
        "endpoints": [dict(e) for e in endpoints],
        "ports": [dict(p) for p in ports],
    }


def workload(
    kind: str,
    namespace: str,
    name: str,
    *,
    replicas: int,
    labels: Mapping[str, str],
    annotations: Mapping[str, str] | None = None,
) -> JsonObj:
    """A Deployment, StatefulSet or DaemonSet selecting ``labels``, with the status its
    controller reports once all ``replicas`` are ready."""
    spec: JsonObj = {
        "replicas": replicas,
        "selector": {"matchLabels": dict(labels)},
        "template": {
            "metadata": {"labels": dict(labels), "annotations": dict(annotations or {})},
            "spec": {"containers": [{"name": "app", "image": DEFAULT_IMAGE}]},
        },
    }
    status: JsonObj = {"observedGeneration": 1, "replicas": replicas, "readyReplicas": replicas}
    if kind == "DaemonSet":
        del spec["replicas"]
        status = {
            "observedGeneration": 1,
            "currentNumberScheduled": replicas,
            "desiredNumberScheduled": replicas,
            "numberReady": replicas,
            "numberAvailable": replicas,
            "updatedNumberScheduled": replicas,
        }
    else:
        status |= {"availableReplicas": replicas, "updatedReplicas": replicas}
    if kind == "StatefulSet":
        spec["serviceName"] = name
    return {
        "apiVersion": "apps/v1",
        "kind": kind,
        "metadata": {"name": name, "namespace": namespace, "labels": dict(labels)},
        "spec": spec,
        "status": status,
    }


def replica_set(deployment: Mapping[str, Any]) -> JsonObj:
    """The ReplicaSet a Deployment controller makes for a stored ``deployment``'s template."""
    spec = deployment["spec"]
    pod_hash = template_hash(spec["template"])
    labels = {**spec["template"]["metadata"].get("labels", {}), "pod-template-hash": pod_hash}
    template = json.loads(json.dumps(spec["template"]))
    template["metadata"]["labels"] = labels
    replicas = spec.get("replicas", 1)
    return {
        "apiVersion": "apps/v1",
        "kind": "ReplicaSet",
        "metadata": {
            "name": f"{deployment['metadata']['name']}-{pod_hash}",
            "namespace": deployment["metadata"]["namespace"],
            "labels": labels,
            "annotations": {"deployment.kubernetes.io/revision": "1"},
            "ownerReferences": [owner_reference(deployment)],
        },
        "spec": {
            "replicas": replicas,
            "selector": {
                "matchLabels": {**spec["selector"]["matchLabels"], "pod-template-hash": pod_hash}
            },
            "template": template,
        },
        "status": {
            "observedGeneration": 1,
            "replicas": replicas,
            "fullyLabeledReplicas": replicas,
            "readyReplicas": replicas,
            "availableReplicas": replicas,
        },
    }
