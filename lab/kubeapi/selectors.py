"""Label and field selectors as the API server reads them from ``?labelSelector=`` and
``?fieldSelector=``.

Label selectors: equality (``=``, ``==``, ``!=``), set-based (``in``, ``notin``),
existence (``key``, ``!key``) and the integer comparisons ``>`` and ``<``; keys and
values are checked like labels. Field selectors: ``=``, ``==`` and ``!=`` on the fields a
resource supports (``resources.check_field``), with ``\\``-escapes for ``,`` ``=`` and
``\\`` in values. A selector that does not parse is a 400, as on the real server.

Both compile once (``LabelSelector.parse``, ``FieldSelector.parse``) so that a watch
filters every event without parsing again.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from detnet.lab.kubeapi.errors import ApiError
from detnet.lab.kubeapi.resources import Resource, check_field, field_value
from detnet.lab.kubeapi.validation import label_value_error, qualified_name_error

_SET_RE = re.compile(r"^\s*(\S+?)\s+(in|notin)\s+\(([^()]*)\)\s*$")
_CMP_RE = re.compile(r"^\s*([^\s=!<>]+)\s*(==|=|!=|>|<)\s*(\S*)\s*$")
_EXISTS_RE = re.compile(r"^\s*(!?)\s*([^\s=!<>(),]+)\s*$")


@dataclass(frozen=True)
class _LabelRequirement:
    key: str
    op: str  # "in", "notin", "exists", "!", ">", "<"
    values: frozenset[str] = frozenset()

    def matches(self, labels: Mapping[str, str]) -> bool:
        if self.op == "exists":
            return self.key in labels
        if self.op == "!":
            return self.key not in labels
        if self.op == "in":
            return self.key in labels and labels[self.key] in self.values
        if self.op == "notin":
            return not (self.key in labels and labels[self.key] in self.values)
        try:
            have, want = int(labels[self.key]), int(next(iter(self.values)))
        except (KeyError, ValueError):
            return False
        return have > want if self.op == ">" else have < want


def _split(selector: str) -> list[str]:
    parts, depth, cur = [], 0, ""
    for ch in selector:
        depth += {"(": 1, ")": -1}.get(ch, 0)
        if ch == "," and depth == 0:
            parts.append(cur)
            cur = ""
        else:
            cur += ch
    if depth != 0:
        raise ApiError(400, f"unable to parse requirement: unbalanced parentheses in {selector!r}")
    if cur.strip() or parts:
        parts.append(cur)
    return parts


def _checked(key: str, values: list[str], requirement: str) -> None:
    if why := qualified_name_error(key):
        raise ApiError(400, f"unable to parse requirement: invalid label key {key!r}: {why}")
    for value in values:
        if why := label_value_error(value):
            raise ApiError(
                400, f"unable to parse requirement: invalid label value {value!r}: {why}"
            )
    if not requirement.strip():
        raise ApiError(400, "unable to parse requirement: empty requirement")


def _requirement(req: str) -> _LabelRequirement:
    if m := _SET_RE.match(req):
        key, op = m.group(1), m.group(2)
        values = [v.strip() for v in m.group(3).split(",")]
        if values == [""]:
            raise ApiError(
                400,
                f"unable to parse requirement: {req!r}: "
                "for 'in', 'notin' operators, values set can't be empty",
            )
        _checked(key, values, req)
        return _LabelRequirement(key, op, frozenset(values))
    if m := _CMP_RE.match(req):
        key, op, value = m.groups()
        if op in (">", "<"):
            if not re.fullmatch(r"-?\d+", value):
                raise ApiError(
                    400,
                    f"unable to parse requirement: {req!r}: "
                    "for 'Gt', 'Lt' operators, the value must be an integer",
                )
            _checked(key, [], req)
            return _LabelRequirement(key, op, frozenset([value]))
        _checked(key, [value], req)
        return _LabelRequirement(key, "notin" if op == "!=" else "in", frozenset([value]))
    if m := _EXISTS_RE.match(req):
        negate, key = m.groups()
        _checked(key, [], req)
        return _LabelRequirement(key, "!" if negate else "exists")
    raise ApiError(400, f"unable to parse requirement: {req.strip()!r}")


@dataclass(frozen=True)
class LabelSelector:
    """A parsed label selector; the empty one matches everything."""

    requirements: tuple[_LabelRequirement, ...] = ()

    @classmethod
    def parse(cls, selector: str) -> LabelSelector:
        """Parse ``selector``; ApiError(400) when it does not parse."""
        return cls(tuple(_requirement(r) for r in _split(selector or "")))

    def matches(self, labels: Mapping[str, str]) -> bool:
        """Whether ``labels`` satisfy every requirement."""
        return all(r.matches(labels) for r in self.requirements)


def selector_matches(selector: str, labels: Mapping[str, str]) -> bool:
    """Whether ``labels`` satisfy a Kubernetes label selector string.

    Raises ApiError(400) for a selector that does not parse."""
    return LabelSelector.parse(selector).matches(labels)


# --- field selectors --------------------------------------------------------------------


def _split_escaped(text: str, seps: str) -> list[str]:
    """Split on unescaped ``seps`` characters, keeping escapes for the next step."""
    parts, cur, i = [], "", 0
    while i < len(text):
        ch = text[i]
        if ch == "\\" and i + 1 < len(text):
            cur += text[i : i + 2]
            i += 2
            continue
        if ch in seps:
            parts.append(cur)
            cur = ""
        else:
            cur += ch
        i += 1
    parts.append(cur)
    return parts


def _unescape(value: str, term: str) -> str:
    out, i = "", 0
    while i < len(value):
        if value[i] == "\\":
            if i + 1 >= len(value) or value[i + 1] not in "\\,=":
                raise ApiError(400, f"invalid field selector: {term!r}: invalid escape sequence")
            out += value[i + 1]
            i += 2
        else:
            if value[i] in ",=":
                raise ApiError(400, f"invalid field selector: {term!r}: unescaped {value[i]!r}")
            out += value[i]
            i += 1
    return out


def _field_term(term: str) -> tuple[str, bool, str]:
    i = 0
    while i < len(term):
        if term[i] == "\\":
            i += 2
            continue
        for op in ("!=", "==", "="):
            if term.startswith(op, i):
                return term[:i], op != "!=", _unescape(term[i + len(op) :], term)
        i += 1
    raise ApiError(400, f"invalid selector: '{term}'; can't understand '{term}'")


@dataclass(frozen=True)
class FieldSelector:
    """A parsed field selector: (field, equal?, value) terms, all of which must hold."""

    terms: tuple[tuple[str, bool, str], ...] = ()

    @classmethod
    def parse(cls, selector: str, res: Resource) -> FieldSelector:
        """Parse ``selector`` for ``res``; ApiError(400) when it does not parse or names a
        field ``res`` does not support."""
        if not selector:
            return cls()
        terms = []
        for raw in _split_escaped(selector, ","):
            if not raw:
                continue  # "a=b," is "a=b", as on the real server
            field, equal, value = _field_term(raw)
            terms.append((check_field(res, field), equal, value))
        return cls(tuple(terms))

    def matches(self, res: Resource, obj: Mapping[str, Any]) -> bool:
        """Whether ``obj`` (of ``res``) satisfies every term."""
        return all((field_value(res, obj, f) == v) == eq for f, eq, v in self.terms)


@dataclass(frozen=True)
class Selection:
    """The label and field selectors of one list or watch."""

    labels: LabelSelector = LabelSelector()
    fields: FieldSelector = FieldSelector()

    @classmethod
    def parse(cls, res: Resource, *, labels: str = "", fields: str = "") -> Selection:
        """Both selectors of a request; ApiError(400) when either does not parse."""
        return cls(LabelSelector.parse(labels), FieldSelector.parse(fields, res))

    def matches(self, res: Resource, obj: Mapping[str, Any]) -> bool:
        """Whether ``obj`` is selected."""
        meta = obj.get("metadata") or {}
        return self.labels.matches(meta.get("labels") or {}) and self.fields.matches(res, obj)

    def predicate(self, res: Resource) -> Callable[[Mapping[str, Any]], bool]:
        """``matches`` bound to ``res``."""
        return lambda obj: self.matches(res, obj)
