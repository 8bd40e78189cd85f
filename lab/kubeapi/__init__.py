"""An emulation of the Kubernetes API server: the control plane of the tests, the benchmarks
and the cluster lab.

It speaks the real REST protocol over HTTP, so the real kubernetes-asyncio client (in this
process or in a ``detnet`` subprocess given ``kubeconfig()``) talks to it unchanged.
"""

from detnet.lab.kubeapi.server import (
    DROP,
    ApiError,
    ApiServerEmulator,
    RecordedRequest,
    json_patch,
    merge_patch,
    selector_matches,
    status_body,
    strategic_merge_patch,
)

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
