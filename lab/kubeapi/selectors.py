"""Label selectors as the API server reads them from ``?labelSelector=``: equality
(``=``, ``==``, ``!=``), set-based (``in``, ``notin``) and existence (``key``, ``!key``)."""

from __future__ import annotations

import re
from collections.abc import Mapping

from detnet.lab.kubeapi.errors import ApiError

_SET_RE = re.compile(r"^\s*([\w./-]+)\s+(in|notin)\s+\(([^)]*)\)\s*$")
_EQ_RE = re.compile(r"^\s*([\w./-]+)\s*(==|=|!=)\s*([\w./-]*)\s*$")
_EXISTS_RE = re.compile(r"^\s*(!?)\s*([\w./-]+)\s*$")


def _split_selector(selector: str) -> list[str]:
    parts, depth, cur = [], 0, ""
    for ch in selector:
        if ch == "(":
            depth += 1
        elif ch == ")":
            depth -= 1
        if ch == "," and depth == 0:
            parts.append(cur)
            cur = ""
        else:
            cur += ch
    if cur.strip():
        parts.append(cur)
    return parts


def selector_matches(selector: str, labels: Mapping[str, str]) -> bool:
    """Whether ``labels`` satisfy a Kubernetes label selector string.

    Raises ApiError(400) for a selector that does not parse."""
    for req in _split_selector(selector or ""):
        if m := _SET_RE.match(req):
            key, op, values = m.group(1), m.group(2), {v.strip() for v in m.group(3).split(",")}
            present = key in labels and labels[key] in values
            if (op == "in" and not present) or (op == "notin" and present):
                return False
        elif m := _EQ_RE.match(req):
            key, op, value = m.groups()
            equal = labels.get(key) == value
            if (op == "!=" and equal) or (op != "!=" and not equal):
                return False
        elif m := _EXISTS_RE.match(req):
            negate, key = m.groups()
            if (key in labels) == bool(negate):
                return False
        else:
            raise ApiError(400, f"unable to parse requirement: {req!r}")
    return True
