"""Kubernetes label selectors in the string form (``app=web,tier in (a,b),!canary``),
parsed once and matched against label maps: the controller-side twin of what the API
server does with ``?labelSelector=`` (the emulation in ``lab/kubeapi`` has its own).

The grammar and the checks are apimachinery's (``labels.Parse``): requirements joined by
``,`` and ANDed; ``key``, ``!key``, ``key=value`` (also ``==``), ``key!=value``,
``key in (v1,v2)``, ``key notin (v1,v2)``, ``key>N`` and ``key<N`` (integers). Keys are
qualified names (an optional DNS-subdomain prefix and ``/``, then at most 63 characters
of ``[A-Za-z0-9._-]`` starting and ending alphanumeric); values are at most 63 such
characters, or empty. ``!=`` and ``notin`` match a map without the key, as on the server.
The empty selector matches everything. A selector of more than ``MAX_SELECTOR_CHARS``
is refused before it is read.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from detnet.engine.parse import show

MAX_SELECTOR_CHARS = 4096

_NAME = re.compile(r"[A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?")
_DNS1123_LABEL = re.compile(r"[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?")
_INTEGER = re.compile(r"[-+]?[0-9]{1,18}")
# apimachinery's lexer: these end an identifier; whitespace separates tokens.
_SPECIAL = "!=(),<>"
_OPERATORS = ("=", "==", "!=", "in", "notin", ">", "<")


class SelectorError(ValueError):
    """A label selector that does not parse; the message says what is wrong."""


@dataclass(frozen=True)
class Requirement:
    """One requirement: ``op`` is one of exists, !exists, =, !=, in, notin, >, <."""

    key: str
    op: str
    values: frozenset[str] = frozenset()

    def matches(self, labels: Mapping[str, str]) -> bool:
        """Whether ``labels`` satisfy this requirement."""
        has = self.key in labels
        if self.op == "exists":
            return has
        if self.op == "!exists":
            return not has
        if self.op in ("=", "in"):
            return has and labels[self.key] in self.values
        if self.op in ("!=", "notin"):
            return not has or labels[self.key] not in self.values
        # > and <: the label must hold an integer (apimachinery: ParseInt, else no match).
        if not has or not _INTEGER.fullmatch(labels[self.key]):
            return False
        (bound,) = self.values
        value = int(labels[self.key])
        return value > int(bound) if self.op == ">" else value < int(bound)


@dataclass(frozen=True)
class LabelSelector:
    """A parsed selector: every requirement must hold (an empty one matches all)."""

    requirements: tuple[Requirement, ...] = ()

    def matches(self, labels: Mapping[str, str]) -> bool:
        """Whether ``labels`` satisfy every requirement."""
        return all(r.matches(labels) for r in self.requirements)

    @property
    def empty(self) -> bool:
        """True for the selector that matches everything."""
        return not self.requirements


def _tokens(text: str) -> list[str]:
    out: list[str] = []
    i, n = 0, len(text)
    while i < n:
        c = text[i]
        if c.isspace():
            i += 1
        elif c in "(),":
            out.append(c)
            i += 1
        elif c in "!=<>":
            two = text[i : i + 2]
            if two in ("!=", "=="):
                out.append(two)
                i += 2
            else:
                out.append(c)
                i += 1
        else:
            j = i
            while j < n and not text[j].isspace() and text[j] not in _SPECIAL:
                j += 1
            out.append(text[i:j])
            i = j
    return out


def check_key(key: str) -> str:
    """A label key as the API server accepts it; SelectorError otherwise."""
    prefix, slash, name = key.rpartition("/")
    if slash and (
        not prefix
        or len(prefix) > 253
        or not all(_DNS1123_LABEL.fullmatch(p) for p in prefix.split("."))
    ):
        raise SelectorError(f"label key {show(key)}: the prefix must be a DNS subdomain")
    if not _NAME.fullmatch(name):
        raise SelectorError(
            f"label key {show(key)}: the name must be 1 to 63 characters of letters, digits, "
            "'-', '_' or '.', starting and ending with a letter or digit"
        )
    return key


def check_value(value: str) -> str:
    """A label value as the API server accepts it (may be empty); SelectorError otherwise."""
    if value and not _NAME.fullmatch(value):
        raise SelectorError(
            f"label value {show(value)}: must be at most 63 characters of letters, digits, "
            "'-', '_' or '.', starting and ending with a letter or digit"
        )
    return value


def _is_word(token: str) -> bool:
    return token not in ("(", ")", ",", "!", "=", "==", "!=", "<", ">")


def parse_selector(text: str) -> LabelSelector:
    """Parse a label selector string; SelectorError with a one-line reason otherwise."""
    if len(text) > MAX_SELECTOR_CHARS:
        raise SelectorError(f"longer than {MAX_SELECTOR_CHARS} characters")
    toks = _tokens(text)
    reqs: list[Requirement] = []
    i = 0

    def take() -> str:
        nonlocal i
        if i >= len(toks):
            raise SelectorError("ends in the middle of a requirement")
        i += 1
        return toks[i - 1]

    while i < len(toks):
        if toks[i] == "!":
            i += 1
            key = take()
            if not _is_word(key):
                raise SelectorError(f"expected a label key after '!', found {show(key)}")
            reqs.append(Requirement(check_key(key), "!exists"))
        else:
            key = take()
            if not _is_word(key) or key in ("in", "notin"):
                raise SelectorError(f"expected a label key, found {show(key)}")
            check_key(key)
            if i >= len(toks) or toks[i] == ",":
                reqs.append(Requirement(key, "exists"))
            else:
                op = take()
                if op not in _OPERATORS:
                    raise SelectorError(
                        f"after {show(key)}: expected an operator, found {show(op)}"
                    )
                if op in ("in", "notin"):
                    reqs.append(Requirement(key, op, _value_set(take)))
                else:
                    value = take() if i < len(toks) and _is_word(toks[i]) else ""
                    if op in (">", "<"):
                        if not _INTEGER.fullmatch(value):
                            raise SelectorError(
                                f"{show(key)} {op}: needs an integer, found {show(value)}"
                            )
                        reqs.append(Requirement(key, op, frozenset({str(int(value))})))
                    else:
                        reqs.append(
                            Requirement(
                                key, "=" if op == "==" else op, frozenset({check_value(value)})
                            )
                        )
        if i < len(toks):
            sep = take()
            if sep != ",":
                raise SelectorError(f"expected ',' between requirements, found {show(sep)}")
            if i >= len(toks):
                raise SelectorError("ends with ','")
    return LabelSelector(tuple(reqs))


def _value_set(take: Callable[[], str]) -> frozenset[str]:
    if take() != "(":
        raise SelectorError("'in' and 'notin' need a parenthesised list of values")
    values: set[str] = set()
    expect_value = True
    while True:
        tok = take()
        if tok == ")":
            if expect_value and values:
                values.add("")  # "a," before ")": apimachinery reads an empty value
            break
        if tok == ",":
            if expect_value:
                values.add("")
            expect_value = True
            continue
        if not expect_value or not _is_word(tok):
            raise SelectorError(f"unexpected {show(tok)} in a list of values")
        values.add(check_value(tok))
        expect_value = False
    if not values:
        raise SelectorError("'in' and 'notin' need at least one value")
    return frozenset(values)
