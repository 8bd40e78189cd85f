"""YAML text -> a bounded tree of values with their lines, and typed readers over it.

The document is composed from the YAML parser's events by a loop, not by PyYAML's
recursive composer, so every bound holds before any work is spent: at most
``MAX_BYTES`` of text, ``MAX_NODES`` values and ``MAX_DEPTH`` levels; anchors and
aliases are refused (a config has no use for them, and they make a few hundred bytes
expand into gigabytes); numbers longer than ``MAX_NUMBER_CHARS`` are refused before
Python converts them. Scalars are converted only when the schema reads them, and a
``Section`` checks a mapping's keys against the allowed ones before reading any value.

Readers (``text``, ``integer(...)``, ``duration(...)``...) turn one ``Value`` into a
typed Python value or raise ``ConfigError`` as ``FILE:LINE: field.path: problem, got X``.
The ranges they are given live in ``schema.py``.
"""

from __future__ import annotations

import difflib
import math
import re
from collections.abc import Callable, Sequence
from typing import Literal, TypeVar

import yaml
from yaml.resolver import Resolver

from detnet.controller.config.model import line_of
from detnet.controller.errors import ConfigError
from detnet.engine.parse import (
    SHOW_LIMIT,
    ParseError,
    escape,
    parse_address,
    parse_duration_ns,
    parse_host,
    show,
)

MAX_BYTES = 1 << 20  # a config is a few KiB
MAX_NODES = 50_000  # values (scalars, lists, mappings); a config has a few hundred
MAX_DEPTH = 32  # nesting levels; a config has four
MAX_NUMBER_CHARS = 64  # longer "numbers" are refused before int()/float() see them
MAX_TEXT_CHARS = 1024  # any string field

Scalar = str | int | float | bool | None
T = TypeVar("T")
Reader = Callable[["Value"], T]

# The C parser when PyYAML has it (30x faster); both emit the same events, and neither
# recurses: the composer below is a loop.
_LOADER: type = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
_STR, _NULL, _BOOL = "tag:yaml.org,2002:str", "tag:yaml.org,2002:null", "tag:yaml.org,2002:bool"
_INT, _FLOAT = "tag:yaml.org,2002:int", "tag:yaml.org,2002:float"
_TIMESTAMP = "tag:yaml.org,2002:timestamp"
_MAP, _SEQ = "tag:yaml.org,2002:map", "tag:yaml.org,2002:seq"
_YAML12_FLOAT = re.compile(r"[-+]?[0-9]+(\.[0-9]*)?[eE][-+]?[0-9]+")
_QUOTED_INT = re.compile(r"\s*[-+]?[0-9]+\s*")
_QUOTED_FLOAT = re.compile(r"\s*[-+]?(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)(?:[eE][-+]?[0-9]+)?\s*")
_CONSTRUCTOR = yaml.constructor.SafeConstructor()
_RESOLVER = Resolver()


class _Node:
    """One composed YAML value. Mappings keep key and value nodes alternating."""

    __slots__ = ("children", "kind", "line", "plain", "tag", "text")

    def __init__(
        self, kind: Literal["scalar", "list", "mapping"], *, line: int, tag: str, text: str = ""
    ) -> None:
        self.kind = kind
        self.line = line
        self.tag = tag
        self.text = text
        self.plain = False  # an unquoted scalar
        self.children: list[_Node] = []


def _compose(text: str, *, source: str, line_offset: int) -> _Node | None:
    """The single document in ``text`` as a node tree, within every bound."""

    def fail(line: int, problem: str) -> ConfigError:
        return ConfigError(f"{source}:{line}: {problem}")

    if len(text) > MAX_BYTES:
        raise ConfigError(f"{source}: larger than {MAX_BYTES >> 20} MiB; a config is a few KiB")
    try:
        size = len(text.encode("utf-8"))
    except UnicodeEncodeError as exc:
        line = text.count("\n", 0, exc.start) + 1 + line_offset
        raise fail(line, "invalid text: not valid Unicode (a lone surrogate)") from exc
    if size > MAX_BYTES:
        raise ConfigError(f"{source}: larger than {MAX_BYTES >> 20} MiB; a config is a few KiB")
    root: _Node | None = None
    stack: list[_Node] = []
    documents = nodes = 0
    try:
        for event in yaml.parse(text, Loader=_LOADER):
            if isinstance(event, yaml.CollectionEndEvent):
                stack.pop()
                continue
            line = (event.start_mark.line + 1 if event.start_mark else 1) + line_offset
            if isinstance(event, yaml.DocumentStartEvent):
                documents += 1
                if documents > 1:
                    raise fail(line, "a second YAML document (---); a config is one document")
                continue
            if isinstance(event, yaml.AliasEvent) or getattr(event, "anchor", None) is not None:
                raise fail(line, "YAML anchors and aliases (&name, *name) are not supported")
            if not isinstance(event, yaml.ScalarEvent | yaml.CollectionStartEvent):
                continue  # stream start/end, document end
            nodes += 1
            if nodes > MAX_NODES:
                raise fail(line, f"more than {MAX_NODES} YAML values; a config has a few hundred")
            tag = event.tag if event.tag not in (None, "!") else None
            if isinstance(event, yaml.ScalarEvent):
                if tag is None:
                    tag = _RESOLVER.resolve(yaml.ScalarNode, event.value, event.implicit)
                node = _Node("scalar", line=line, tag=tag, text=event.value)
                node.plain = event.style is None
            else:
                is_map = isinstance(event, yaml.MappingStartEvent)
                if tag not in (None, _MAP if is_map else _SEQ):
                    raise fail(line, f"unsupported YAML tag {show(tag)}")
                if len(stack) >= MAX_DEPTH:
                    raise fail(line, f"nested deeper than {MAX_DEPTH} levels")
                node = _Node(
                    "mapping" if is_map else "list", line=line, tag=_MAP if is_map else _SEQ
                )
            if stack:
                stack[-1].children.append(node)
            else:
                root = node
            if node.kind != "scalar":
                stack.append(node)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        line = (mark.line + 1 if mark else 1) + line_offset
        what = escape(exc.problem or exc.context or "syntax error")[:200]
        raise fail(line, f"invalid YAML: {what}") from exc
    except yaml.reader.ReaderError as exc:
        line = text.count("\n", 0, max(exc.position, 0)) + 1 + line_offset
        code = exc.character if isinstance(exc.character, int) else 0
        raise fail(line, f"invalid YAML: unacceptable character U+{code:04X}") from exc
    except yaml.YAMLError as exc:
        raise ConfigError(f"{source}: invalid YAML: {escape(str(exc))[:200]}") from exc
    return root


def _construct(node: _Node) -> Scalar:
    """The Python value of a scalar node; ValueError when it cannot have one."""
    tag, text = node.tag, node.text
    if tag in (_STR, _TIMESTAMP):  # no dates here (YAML 1.2 has none): the text as written
        if node.plain and len(text) <= MAX_NUMBER_CHARS and _YAML12_FLOAT.fullmatch(text):
            # PyYAML (YAML 1.1) reads plain 1e-6 as a string; YAML 1.2 and users mean a number.
            return float(text)
        return text
    if tag == _NULL:
        return None
    if tag == _BOOL:
        if text.lower() not in _CONSTRUCTOR.bool_values:
            raise ValueError(f"not a boolean: {show(text)}")
        return bool(_CONSTRUCTOR.bool_values[text.lower()])
    if tag in (_INT, _FLOAT):
        if len(text) > MAX_NUMBER_CHARS:
            raise ValueError(
                f"too long for a number ({len(text)} characters, at most {MAX_NUMBER_CHARS})"
            )
        try:
            if tag == _INT:
                return int(_CONSTRUCTOR.construct_yaml_int(yaml.ScalarNode(tag, text)))
            return float(_CONSTRUCTOR.construct_yaml_float(yaml.ScalarNode(tag, text)))
        except (ValueError, TypeError, IndexError) as exc:
            raise ValueError(f"not a valid number: {show(text)}") from exc
    raise ValueError(f"unsupported YAML tag {show(tag)}; write a plain value")


class Value:
    """One value of the document at a field path (``critical_apps[0].port``)."""

    __slots__ = ("doc", "node", "path")

    def __init__(self, doc: Document, node: _Node, *, path: str) -> None:
        self.doc, self.node, self.path = doc, node, path

    @property
    def line(self) -> int:
        """The line the value starts on, in the file."""
        return self.node.line

    @property
    def is_mapping(self) -> bool:
        """A YAML mapping."""
        return self.node.kind == "mapping"

    def is_null(self) -> bool:
        """An empty or ``null`` scalar."""
        return self.node.kind == "scalar" and self.node.tag == _NULL

    def scalar(self) -> Scalar:
        """The scalar's Python value (ConfigError for a list, a mapping or a bad tag)."""
        if self.node.kind != "scalar":
            raise self.error(f"must be a single value, got {self.shown()}")
        try:
            return _construct(self.node)
        except ValueError as exc:
            raise self.error(str(exc)) from exc

    def items(self) -> list[Value]:
        """The values of a list, each with its ``path[i]`` and line recorded."""
        out = []
        for i, node in enumerate(self.node.children):
            path = f"{self.path}[{i}]"
            self.doc.lines[path] = node.line
            out.append(Value(self.doc, node, path=path))
        return out

    def length(self) -> int:
        """How many values a list holds."""
        return len(self.node.children)

    def shown(self) -> str:
        """The value for 'got ...' in messages: short, quoted, escaped."""
        if self.node.kind == "mapping":
            return "a mapping"
        if self.node.kind == "list":
            return "a list"
        try:
            return show(_construct(self.node))
        except ValueError:
            return show(self.node.text)

    def error(self, message: str) -> ConfigError:
        """``FILE:LINE: path: message``."""
        return self.doc.error(self.path, message)

    def wrong(self, expected: str) -> ConfigError:
        """``FILE:LINE: path: expected, got X``."""
        return self.error(f"{expected}, got {self.shown()}")


class Document:
    """A composed YAML document and the line of every field path read from it."""

    def __init__(self, source: str, text: str, *, line_offset: int = 0) -> None:
        self.source = source
        self.lines: dict[str, int] = {}
        node = _compose(text, source=source, line_offset=line_offset)
        self.root = None if node is None else Value(self, node, path="")
        if node is not None:
            self.lines[""] = node.line

    def line(self, path: str) -> int | None:
        """The line of ``path``, or of its nearest parent that has one."""
        return line_of(self.lines, path)

    def error(self, path: str, message: str) -> ConfigError:
        """A ConfigError ``FILE:LINE: path: message``."""
        line = self.line(path)
        prefix = f"{self.source}:{line}" if line else self.source
        return ConfigError(f"{prefix}: {path}: {message}" if path else f"{prefix}: {message}")


class Section:
    """One mapping of the document: its keys are checked against ``allowed`` (unknown,
    duplicate, not a string) before any value is read; then typed reads by key.

    An absent or null section is empty. ``adopt`` files a value read elsewhere (a
    prototype spelling) under one of our keys; errors about it still name its own path."""

    def __init__(
        self, doc: Document, path: str, *, value: Value | None, allowed: Sequence[str]
    ) -> None:
        self.doc, self.path = doc, path
        self.values: dict[str, Value] = {}
        if value is None or value.is_null():
            return
        if not value.is_mapping:
            raise value.wrong("must be a mapping")
        children = value.node.children
        for key_node, value_node in zip(children[0::2], children[1::2], strict=True):
            if key_node.kind != "scalar":
                raise ConfigError(f"{doc.source}:{key_node.line}: keys must be plain strings")
            key = key_node.text
            if key not in allowed:
                hint = difflib.get_close_matches(key, allowed, n=1) if len(key) < 64 else []
                more = f" (did you mean {hint[0]!r}?)" if hint else ""
                where = f"{doc.source}:{key_node.line}: {self.sub(escape(key[:SHOW_LIMIT]))}"
                raise ConfigError(f"{where}: unknown key{more}; known keys: {', '.join(allowed)}")
            sub = self.sub(key)
            if key in self.values:
                raise ConfigError(f"{doc.source}:{key_node.line}: {sub}: duplicate key")
            doc.lines[sub] = key_node.line
            self.values[key] = Value(doc, value_node, path=sub)

    def sub(self, key: str) -> str:
        """The path of ``key`` in this section."""
        return f"{self.path}.{key}" if self.path else key

    def has(self, key: str) -> bool:
        """The key is present and not null."""
        return key in self.values and not self.values[key].is_null()

    def value(self, key: str) -> Value | None:
        """The key's value, or None when absent or null."""
        return self.values[key] if self.has(key) else None

    def adopt(self, key: str, value: Value) -> None:
        """Read ``value`` (from another path) as this section's ``key``."""
        self.values[key] = value

    def err(self, key: str, message: str) -> ConfigError:
        """A ConfigError about ``key`` (at the path its value came from)."""
        path = self.values[key].path if key in self.values else self.sub(key)
        return self.doc.error(path, message)

    def get(self, key: str, read: Reader[T], default: T) -> T:
        """``read`` of the key's value, or ``default`` when absent or null."""
        value = self.value(key)
        return default if value is None else read(value)

    def need(self, key: str, read: Reader[T]) -> T:
        """``read`` of a required key's value."""
        value = self.value(key)
        if value is None:
            raise self.doc.error(self.sub(key), "missing (required)")
        return read(value)


# -------------------------------------------------------------------------- readers


def text(value: Value, *, max_chars: int = MAX_TEXT_CHARS) -> str:
    """A non-empty string without control or format characters, stripped."""
    v = value.scalar() if value.node.kind == "scalar" else None
    if not isinstance(v, str) or not v.strip():
        raise value.wrong("must be a non-empty string")
    v = v.strip()
    if not v.isprintable():
        raise value.wrong("must not contain control, format or line-break characters")
    if len(v) > max_chars:
        raise value.wrong(f"must be at most {max_chars} characters")
    return v


def host(value: Value) -> str:
    """An IP address or a DNS name."""
    v = text(value, max_chars=253)
    try:
        return parse_host(v)
    except ParseError as exc:
        raise value.wrong(str(exc)) from exc


def boolean(value: Value) -> bool:
    """``true`` or ``false``."""
    v = value.scalar() if value.node.kind == "scalar" else None
    if not isinstance(v, bool):
        raise value.wrong("must be true or false")
    return v


def _number(value: Value) -> int | float | None:
    """A YAML number, or a quoted one (``"5201"``, as the prototype's loader took it)."""
    if value.node.kind != "scalar":
        return None
    v = value.scalar()
    if isinstance(v, str) and len(v) <= MAX_NUMBER_CHARS:
        if _QUOTED_INT.fullmatch(v):
            return int(v)
        if _QUOTED_FLOAT.fullmatch(v):
            return float(v)
    if isinstance(v, bool) or not isinstance(v, int | float):
        return None
    return v


def integer(low: int, high: int, *, unit: str = "") -> Reader[int]:
    """A whole number from ``low`` to ``high``."""

    def read(value: Value) -> int:
        v = _number(value)
        if not isinstance(v, int):
            raise value.wrong("must be a whole number")
        if not low <= v <= high:
            raise value.wrong(f"must be from {low} to {high}{unit}")
        return v

    return read


def positive(high: float, *, low: float = 0.0) -> Reader[float]:
    """A number above 0, at least ``low`` and at most ``high``."""

    def read(value: Value) -> float:
        v = _number(value)
        if v is None or not math.isfinite(v) or v <= 0:
            raise value.wrong("must be a positive number")
        if v < low:
            raise value.wrong(f"must be at least {low:g}")
        if v > high:
            raise value.wrong(f"must be at most {high:g}")
        return float(v)

    return read


def number_in(low: float, high: float) -> Reader[float]:
    """A number from ``low`` to ``high``, both included."""

    def read(value: Value) -> float:
        v = _number(value)
        if v is None or not math.isfinite(v) or not low <= v <= high:
            raise value.wrong(f"must be a number from {low:g} to {high:g}")
        return float(v)

    return read


def fraction(value: Value) -> float:
    """A number strictly between 0 and 1."""
    v = _number(value)
    if v is None or not 0 < v < 1:  # NaN fails both comparisons
        raise value.wrong("must be a fraction between 0 and 1")
    return float(v)


def mbit(low: int, high: int) -> Reader[int]:
    """Whole Mbit/s, the unit of the annotation: 2.0 is fine, 2.5 is not."""

    def read(value: Value) -> int:
        v = _number(value)
        if isinstance(v, float) and v.is_integer():
            v = int(v)
        if not isinstance(v, int) or not low <= v <= high:
            raise value.wrong(f"must be a whole number of Mbit/s from {low} to {high}")
        return v

    return read


def duration(min_ns: int, max_ns: int) -> Reader[float]:
    """Seconds, from a number (seconds) or a string like "250ms", "1.5s", "2m"."""

    def read(value: Value) -> float:
        v = value.scalar() if value.node.kind == "scalar" else None
        if not isinstance(v, str | int | float) or isinstance(v, bool):
            raise value.wrong("must be a duration like 250ms or 1.5s")
        try:
            return parse_duration_ns(v, min_ns=min_ns, max_ns=max_ns) / 1e9
        except ParseError as exc:
            raise value.wrong(str(exc)) from exc

    return read


def address(*, port_zero: bool) -> Reader[str]:
    """``HOST:PORT`` (``:PORT``, ``[V6]:PORT``), as written."""

    def read(value: Value) -> str:
        v = text(value, max_chars=300)
        try:
            parse_address(v, port_zero=port_zero)
        except ParseError as exc:
            raise value.wrong(str(exc)) from exc
        return v

    return read
