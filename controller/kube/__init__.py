"""How detnet talks to a Kubernetes API server, for every part that does.

- ``detnet.controller.kube.api``: client configuration, the ``ApiClient`` with our user
  agent, the client-side QPS limiter and ``KubeClient`` (limiter + retry + raw JSON),
  through which the enforcer and the leader elector make every call.
- ``detnet.controller.kube.listwatch``: ``ListWatch``, list-then-watch one collection
  (410 re-list, bookmarks, inactivity timeout, backoff) feeding a ``WatchSink``.
- ``detnet.controller.kube.objects``: sans-I/O helpers for the JSON objects (watch
  events, resourceVersion, annotations).

This module holds only the client defaults, so the config can read them without
importing kubernetes-asyncio (which takes most of a second).
"""

from __future__ import annotations

# client-go's defaults are 5 QPS / burst 10, sized for a kubelet's background work; the
# enforcer patches every pod of a workload within one actuation delay, so it needs more.
DEFAULT_QPS = 100.0
"""Client-side requests per second to the API server (the config's ``kubernetes.qps``)."""
DEFAULT_BURST = 50
"""Requests the limiter lets through at once before QPS applies."""
DEFAULT_CONCURRENCY = 8
"""Writes (patches) in flight at once (the config's ``kubernetes.concurrency``)."""
