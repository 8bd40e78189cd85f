"""An emulation of the Kubernetes API server: the control plane of the tests, the benchmarks
and the cluster lab.

It speaks the real REST protocol over HTTP, so the real kubernetes-asyncio client (in this
process or in a ``detnet`` subprocess given ``kubeconfig()``) talks to it unchanged.

Modules: ``errors`` (ApiError, Status bodies), ``resources`` (what is served, field
sets, path parsing), ``validation`` (names and labels), ``selectors`` (label and field
selectors), ``patch`` (merge, strategic merge, JSON patch), ``store`` (objects,
resourceVersions, watch history), ``strategy`` (what the registry does on the way in),
``controllers`` (EndpointSlices, garbage collection), ``auth`` (tokens, TokenReview,
TokenRequest), ``discovery``, ``builders`` (realistic objects), ``cluster`` (the state
tests arrange and read), ``server`` (HTTP, faults, the record of requests).
"""

from detnet.lab.kubeapi.errors import ApiError, status_body
from detnet.lab.kubeapi.patch import json_patch, merge_patch, strategic_merge_patch
from detnet.lab.kubeapi.selectors import selector_matches
from detnet.lab.kubeapi.server import DROP, ApiServerEmulator, RecordedRequest

__all__ = [
    "DROP",
    "ApiError",
    "ApiServerEmulator",
    "RecordedRequest",
    "json_patch",
    "merge_patch",
    "selector_matches",
    "status_body",
    "strategic_merge_patch",
]
