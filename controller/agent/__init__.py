"""``detnet agent``: one per node (a DaemonSet), it measures every pod of its node from
kernel counters and serves ``GET /v1/usage`` to the controller (docs/agent.md).

- ``pods``: the pods of this node, from a list+watch (``fieldSelector=spec.nodeName``);
- ``cgroups``: ``/proc/PID/cgroup`` -> pod UID and QoS, both kubelet drivers, cgroup v1
  and v2, from any cgroup namespace (sans-I/O);
- ``procfs``: finds a process of each pod in ``/proc`` (bounded scans, pidfds) and reads
  its ``/proc/PID/net/dev``;
- ``netdev``, ``rates``: counters and per-pod rates across resets and wraps (sans-I/O);
- ``sampler``: one tick of all that, into an immutable snapshot;
- ``auth``: bearer tokens checked by TokenReview, cached, against an allow list;
- ``server``: the ``/v1/usage`` route; ``wire``: its JSON document (the controller's
  ``usage.py`` reads it with the same module); ``metrics``: the agent's /metrics;
- ``service``: all of it running; ``cli``: ``detnet agent``.

Nothing here is imported by the package itself: the CLI's entry point stays light.
"""
