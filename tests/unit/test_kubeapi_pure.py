"""The pure parts of the API server emulation, without sockets: label selectors and the
three patch formats."""

from __future__ import annotations

import pytest

from detnet.lab.kubeapi import (
    ApiError,
    json_patch,
    merge_patch,
    selector_matches,
    strategic_merge_patch,
)


@pytest.mark.parametrize(
    ("selector", "expected"),
    [
        ("app=web", True),
        ("app==web,tier=be", True),
        ("app!=web", False),
        ("app in (web, db)", True),
        ("app notin (web)", False),
        ("tier", True),
        ("!tier", False),
        ("!missing,app in (x,web)", True),
        ("", True),
    ],
)
def test_selector_matches(selector: str, expected: bool) -> None:
    assert selector_matches(selector, {"app": "web", "tier": "be"}) is expected


def test_bad_selector_is_400() -> None:
    with pytest.raises(ApiError) as info:
        selector_matches("app in web", {})
    assert info.value.code == 400


def test_merge_patch_rfc7386() -> None:
    doc = {"a": {"b": 1, "c": 2}, "l": [1, 2]}
    assert merge_patch(doc, {"a": {"b": None, "d": 3}, "l": [3]}) == {
        "a": {"c": 2, "d": 3},
        "l": [3],
    }


def test_strategic_merge_patch_merges_containers_by_name() -> None:
    doc = {"spec": {"containers": [{"name": "a", "image": "1"}, {"name": "b", "image": "1"}]}}
    patch = {"spec": {"containers": [{"name": "b", "image": "2"}, {"name": "c", "image": "3"}]}}
    out = strategic_merge_patch(doc, patch)
    assert out["spec"]["containers"] == [
        {"name": "a", "image": "1"},
        {"name": "b", "image": "2"},
        {"name": "c", "image": "3"},
    ]
    assert strategic_merge_patch({"m": {"x": 1}}, {"m": {"x": None}}) == {"m": {}}


def test_json_patch() -> None:
    doc = {"metadata": {"annotations": {"a": "1"}}}
    ops = [
        {"op": "add", "path": "/metadata/annotations/b~1c", "value": "2"},
        {"op": "remove", "path": "/metadata/annotations/a"},
    ]
    assert json_patch(doc, ops) == {"metadata": {"annotations": {"b/c": "2"}}}
