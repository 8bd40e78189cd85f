"""What the real API server rejects before it stores an object, with its wording: names
(RFC 1123 subdomains, DNS-1035 labels for Services), label keys and values, annotation
keys, and the JSON types of ``metadata`` maps.

The same checks serve label selectors (a selector naming an invalid key is a 400), so
there is one definition of a valid label.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

from detnet.lab.kubeapi.errors import ApiError

_SUBDOMAIN_RE = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")
_LABEL_1123_RE = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
_LABEL_1035_RE = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")
_NAME_PART_RE = re.compile(r"^([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9]$")
_VALUE_RE = re.compile(r"^(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?$")

_TOTAL_ANNOTATION_BYTES = 256 * 1024


def subdomain_error(value: str) -> str | None:
    """Why ``value`` is no RFC 1123 subdomain (most object names), or None."""
    if len(value) > 253:
        return "must be no more than 253 characters"
    if not _SUBDOMAIN_RE.match(value):
        return (
            "a lowercase RFC 1123 subdomain must consist of lower case alphanumeric "
            "characters, '-' or '.', and must start and end with an alphanumeric character"
        )
    return None


def dns1123_label_error(value: str) -> str | None:
    """Why ``value`` is no RFC 1123 label (namespace names), or None."""
    if len(value) > 63:
        return "must be no more than 63 characters"
    if not _LABEL_1123_RE.match(value):
        return (
            "a lowercase RFC 1123 label must consist of lower case alphanumeric characters "
            "or '-', and must start and end with an alphanumeric character"
        )
    return None


def dns1035_label_error(value: str) -> str | None:
    """Why ``value`` is no DNS-1035 label (Service names), or None."""
    if len(value) > 63:
        return "must be no more than 63 characters"
    if not _LABEL_1035_RE.match(value):
        return (
            "a DNS-1035 label must consist of lower case alphanumeric characters or '-', "
            "start with an alphabetic character, and end with an alphanumeric character"
        )
    return None


def qualified_name_error(key: str) -> str | None:
    """Why ``key`` is no qualified name (``[prefix/]name``: label and annotation keys)."""
    prefix, _, name = key.rpartition("/")
    if "/" in key and not prefix:
        return "prefix part must be non-empty"
    if prefix and (err := subdomain_error(prefix)):
        return f"prefix part {err}"
    if not name:
        return "name part must be non-empty"
    if len(name) > 63:
        return "name part must be no more than 63 characters"
    if not _NAME_PART_RE.match(name):
        return (
            "name part must consist of alphanumeric characters, '-', '_' or '.', and must "
            "start and end with an alphanumeric character"
        )
    return None


def label_value_error(value: str) -> str | None:
    """Why ``value`` is no label value, or None."""
    if len(value) > 63:
        return "must be no more than 63 characters"
    if not _VALUE_RE.match(value):
        return (
            "a valid label must be an empty string or consist of alphanumeric characters, "
            "'-', '_' or '.', and must start and end with an alphanumeric character"
        )
    return None


def check_types(obj: Any, *, code: int = 400) -> None:
    """ApiError(``code``) when ``metadata``'s string maps hold something else, as the
    real server fails to decode such a body (400; 422 when a patch produced it)."""
    meta = obj.get("metadata") if isinstance(obj, Mapping) else None
    if meta is None:
        return
    if not isinstance(meta, Mapping):
        raise ApiError(code, "json: cannot unmarshal metadata: it must be an object")
    for what in ("labels", "annotations"):
        values = meta.get(what)
        if values is None:
            continue
        if not isinstance(values, Mapping):
            raise ApiError(code, f"json: cannot unmarshal metadata.{what}: it must be a map")
        for key, value in values.items():
            if not isinstance(value, str):
                raise ApiError(
                    code,
                    f"json: cannot unmarshal {type(value).__name__} into Go struct field "
                    f"ObjectMeta.metadata.{what} of type string (key {key!r})",
                )


def _invalid(kind: str, name: str, field: str, value: Any, why: str) -> ApiError:
    return ApiError(
        422,
        f'{kind} "{name}" is invalid: {field}: Invalid value: "{value}": {why}',
        name=name,
        kind=kind,
    )


def validate_object(obj: Mapping[str, Any], *, kind: str) -> None:
    """ApiError(422) for what the real server's validation would refuse in ``metadata``."""
    meta = obj["metadata"]
    name = meta.get("name") or ""
    if not name:
        raise ApiError(
            422,
            f"{kind} is invalid: metadata.name: Required value: name or generateName is required",
            kind=kind,
        )
    why = dns1035_label_error(name) if kind == "Service" else subdomain_error(name)
    if why:
        raise _invalid(kind, name, "metadata.name", name, why)
    namespace = meta.get("namespace")
    if namespace and (why := dns1123_label_error(namespace)):
        raise _invalid(kind, name, "metadata.namespace", namespace, why)
    for key, value in (meta.get("labels") or {}).items():
        if why := qualified_name_error(key):
            raise _invalid(kind, name, "metadata.labels", key, why)
        if why := label_value_error(value):
            raise _invalid(kind, name, f"metadata.labels[{key}]", value, why)
    annotations = meta.get("annotations") or {}
    for key in annotations:
        if why := qualified_name_error(key.lower()):
            raise _invalid(kind, name, "metadata.annotations", key, why)
    size = sum(len(k) + len(v) for k, v in annotations.items())
    if size > _TOTAL_ANNOTATION_BYTES:
        raise ApiError(
            422,
            f'{kind} "{name}" is invalid: metadata.annotations: Too long: may not be more than '
            f"{_TOTAL_ANNOTATION_BYTES} bytes",
            name=name,
            kind=kind,
        )
