"""A critical app's probe endpoints, from its Service's EndpointSlices (issue 13, section
1): one target per ready endpoint, with its app, pod and node.

- ``service``: ``parse_service()``, the config's ``service:`` to a ``ServiceRef``.
- ``slices``: the pure reducer, EndpointSlices to ``ProbeEndpoint``s
  (``reduce_slices``, ``SliceCache``), and the target naming rule.
- ``feed``: when a change is delivered (``EndpointFeed``, ``EndpointDiff``), sans-I/O.
- ``watch``: ``EndpointWatch``, the Service's ``get`` and the slices' list+watch.

``watch`` imports kubernetes-asyncio; the others do not, so the config can use
``service`` without paying for it.
"""
