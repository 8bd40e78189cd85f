"""Which Kubernetes Service a critical app names: the parser of the config's ``service:``
for apps resolved through their EndpointSlices.

``service:`` is ``NAME.NAMESPACE.svc`` (optionally followed by the cluster domain, e.g.
``NAME.NAMESPACE.svc.cluster.local``, with or without the final dot of an absolute
name), or a bare ``NAME`` with the namespace given beside it (the config's
``namespace:``). A qualified name and a given namespace must agree. NAME is a Service
name (an RFC 1035 label: lower case, starts with a letter, at most 63 characters),
NAMESPACE a namespace name (an RFC 1123 label). Pure: no DNS, no API call.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from detnet.engine.parse import ParseError, show

MAX_SERVICE_CHARS = 253  # a DNS name; anything longer is refused before it is read
# apimachinery's IsDNS1035Label (a Service's name) and IsDNS1123Label (a namespace).
DNS1035_LABEL = re.compile(r"[a-z]([-a-z0-9]{0,61}[a-z0-9])?")
DNS1123_LABEL = re.compile(r"[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?")
_FORMS = "NAME.NAMESPACE.svc[.cluster.local], or NAME with a namespace"


class ServiceNameError(ParseError):
    """A ``service:`` that does not name a Service; the message says why (one line),
    the caller says where."""


@dataclass(frozen=True)
class ServiceRef:
    """A Service by name and namespace."""

    name: str
    namespace: str

    def __str__(self) -> str:
        return f"{self.namespace}/{self.name}"

    @property
    def dns_name(self) -> str:
        """``NAME.NAMESPACE.svc``, the name that resolves to it in any cluster domain."""
        return f"{self.name}.{self.namespace}.svc"


def parse_service(text: str, *, namespace: str | None = None) -> ServiceRef:
    """The Service ``text`` names (see the module docstring); ``namespace`` is the one
    given beside it, if any. ServiceNameError when it names none."""
    if not isinstance(text, str):
        raise ServiceNameError(f"service must be a string, not {show(text)}")
    if len(text) > MAX_SERVICE_CHARS:
        raise ServiceNameError(
            f"service {show(text)} is longer than a DNS name ({MAX_SERVICE_CHARS} characters)"
        )
    if namespace is not None:
        _check_label(namespace, DNS1123_LABEL, what="namespace")
    if not text:
        raise ServiceNameError(f"service is empty: expected {_FORMS}")
    labels = text.removesuffix(".").split(".") if "." in text else [text]
    if len(labels) == 1:
        name = _check_label(labels[0], DNS1035_LABEL, what="service name")
        if namespace is None:
            raise ServiceNameError(
                f"service {show(text)} has no namespace: write {text}.NAMESPACE.svc "
                "or give the namespace"
            )
        return ServiceRef(name, namespace)
    if len(labels) < 3 or labels[2] != "svc":
        raise ServiceNameError(f"service {show(text)}: expected {_FORMS}")
    name = _check_label(labels[0], DNS1035_LABEL, what="service name")
    ns = _check_label(labels[1], DNS1123_LABEL, what="namespace")
    for label in labels[3:]:  # the cluster domain: cluster.local unless the cluster says
        _check_label(label, DNS1123_LABEL, what="cluster domain label", where=text)
    if namespace is not None and namespace != ns:
        raise ServiceNameError(
            f"service {show(text)} is in namespace {show(ns)}, "
            f"but the namespace given is {show(namespace)}"
        )
    return ServiceRef(name, ns)


def _check_label(label: str, rule: re.Pattern[str], *, what: str, where: str = "") -> str:
    if not isinstance(label, str) or not rule.fullmatch(label):
        if isinstance(label, str) and label and rule.fullmatch(label.lower()):
            why = "Kubernetes names are lower case"
        elif isinstance(label, str) and len(label) > 63:
            why = "at most 63 characters"
        elif rule is DNS1035_LABEL:
            why = "letters a-z, digits and '-', starting with a letter"
        else:
            why = "letters a-z, digits and '-'"
        in_where = f" in {show(where)}" if where else ""
        raise ServiceNameError(f"{what} {show(label)}{in_where} is not valid: {why}")
    return label
