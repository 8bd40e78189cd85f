"""The cluster lab: the path users deploy (pod annotations through the API server, a
bandwidth manager on each node, many nodes), built on one machine out of network
namespaces, kubelet-shaped cgroups and the API server emulation.

Modules: ``plan`` (nodes, pods, addresses: pure), ``quantity`` (the Kubernetes quantity
as Cilium reads it: pure), ``network`` (namespaces, bridges, uplinks, pods in cgroups,
processes, cleanup of a killed run), ``controlplane`` (the API server emulation served
from inside the lab's control-plane namespace), ``cilium`` (the per-node stand-in for
Cilium's bandwidth manager, ``python -m detnet.lab.cluster.cilium``), ``detnetconfig``
(the controller's config, in one function, and which features this detnet has),
``recording`` (what a run records as it happens), ``report`` (the figures: pure),
``scenario`` (the cluster and its runs), ``command`` (``detnet lab --topology cluster``).
docs/lab.md describes it all.
"""
