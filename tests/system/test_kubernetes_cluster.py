"""The Kubernetes enforcer and leader election against a real cluster (KUBECONFIG).

Creates a throwaway namespace with one pause Deployment, applies a limit, checks every
Running pod carries it and the template does not, and deletes the namespace."""

from __future__ import annotations

import asyncio
import os
import uuid
from typing import Any

import pytest
from kubernetes_asyncio import client

from detnet.controller.enforce.kubernetes import (
    EGRESS_ANNOTATION,
    KubernetesEnforcer,
    load_client_configuration,
)
from detnet.controller.leader import LeaseElector
from detnet.controller.workloads import BestEffortTarget, Scope

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        not os.environ.get("KUBECONFIG"), reason="needs a cluster: set KUBECONFIG to run"
    ),
]


async def test_enforcer_and_lease_on_a_real_cluster() -> None:
    ns = f"detnet-test-{uuid.uuid4().hex[:6]}"
    conf = await load_client_configuration()
    async with client.ApiClient(conf) as ac:
        core: Any = client.CoreV1Api(ac)  # dict bodies: the stubs want models
        apps: Any = client.AppsV1Api(ac)
        await core.create_namespace({"metadata": {"name": ns}})
        try:
            labels = {"app": "be"}
            await apps.create_namespaced_deployment(
                ns,
                {
                    "metadata": {"name": "be"},
                    "spec": {
                        "replicas": 2,
                        "selector": {"matchLabels": labels},
                        "template": {
                            "metadata": {"labels": labels},
                            "spec": {
                                "containers": [
                                    {"name": "pause", "image": "registry.k8s.io/pause:3.9"}
                                ]
                            },
                        },
                    },
                },
            )
            for _ in range(120):
                pods = (await core.list_namespaced_pod(ns, label_selector="app=be")).items
                if len([p for p in pods if p.status.phase == "Running"]) == 2:
                    break
                await asyncio.sleep(1)
            enforcer = KubernetesEnforcer(
                [BestEffortTarget(name="be", namespace=ns)], api_client=ac
            )
            await enforcer.start()
            try:
                await enforcer.apply({Scope("be"): 42})
            finally:
                await enforcer.close()
            pods = (await core.list_namespaced_pod(ns, label_selector="app=be")).items
            running = [p for p in pods if p.status.phase == "Running"]
            assert running
            assert {p.metadata.annotations.get(EGRESS_ANNOTATION) for p in running} == {"42M"}
            dep = await apps.read_namespaced_deployment("be", ns)
            assert EGRESS_ANNOTATION not in (dep.spec.template.metadata.annotations or {})

            elector = LeaseElector(api_client=ac, namespace=ns, name="detnet", identity="t")
            ran: list[bool] = []

            async def work() -> None:
                ran.append(elector.is_leader)

            await asyncio.wait_for(elector.run(work), 30)
            assert ran == [True]
        finally:
            await core.delete_namespace(ns)
