"""The enforcer's pod-watch reducer, without HTTP: table tests, and a hypothesis test that
replaying any event sequence leaves the cache equal to a tiny reference model's."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from detnet.controller.enforce.podwatch import (
    EGRESS_ANNOTATION,
    PodCache,
    needs_limit,
    running,
)
from detnet.controller.kube.objects import WatchEvent


def pod(
    name: str,
    rv: int | str = 1,
    *,
    phase: str = "Running",
    value: str | None = None,
    deleting: bool = False,
) -> dict[str, Any]:
    meta: dict[str, Any] = {"name": name, "resourceVersion": str(rv), "annotations": {}}
    if value is not None:
        meta["annotations"][EGRESS_ANNOTATION] = value
    if deleting:
        meta["deletionTimestamp"] = "2026-01-01T00:00:00Z"
    return {"metadata": meta, "status": {"phase": phase}}


def ev(type_: str, obj: dict[str, Any]) -> WatchEvent:
    return WatchEvent(type_, obj)


@pytest.mark.parametrize(
    ("obj", "value", "expected"),
    [
        (pod("a"), "80M", True),
        (pod("a", value="80M"), "80M", False),
        (pod("a", value="90M"), "80M", True),
        (pod("a"), None, False),  # no limit yet: nothing to write
        (pod("a", phase="Pending"), "80M", False),  # Running pods only
        (pod("a", phase="Succeeded"), "80M", False),
        (pod("a", deleting=True), "80M", False),  # terminating: leave it alone
        ({"metadata": {"name": "a"}}, "80M", False),  # no status at all
        ({"metadata": {"name": "a"}, "status": "Running"}, "80M", False),  # malformed
    ],
)
def test_needs_limit(obj: dict[str, Any], value: str | None, expected: bool) -> None:
    assert needs_limit(obj, value) is expected
    if expected:
        assert running(obj)


@pytest.mark.parametrize(
    ("cached", "event", "limit", "to_patch", "after"),
    [
        # a new Running pod without the annotation: patch it
        ([], ev("ADDED", pod("a", 5)), "80M", ["a"], {"a": "5"}),
        # a new Pending pod: cached, patched once it is Running
        ([], ev("ADDED", pod("a", 5, phase="Pending")), "80M", [], {"a": "5"}),
        ([pod("a", 5, phase="Pending")], ev("MODIFIED", pod("a", 6)), "80M", ["a"], {"a": "6"}),
        # already carries the limit
        ([], ev("ADDED", pod("a", 5, value="80M")), "80M", [], {"a": "5"}),
        # no limit yet
        ([], ev("ADDED", pod("a", 5)), None, [], {"a": "5"}),
        # a stale event does not overwrite a newer copy (a patch response)...
        ([pod("a", 9, value="80M")], ev("MODIFIED", pod("a", 7)), "80M", [], {"a": "9"}),
        # ...and is judged on that copy, which needs the new limit
        ([pod("a", 9, value="70M")], ev("MODIFIED", pod("a", 7)), "80M", ["a"], {"a": "9"}),
        # equal resourceVersions (or opaque ones): the later copy wins
        ([pod("a", 9, value="80M")], ev("MODIFIED", pod("a", 9)), "80M", ["a"], {"a": "9"}),
        ([pod("a", "x", value="80M")], ev("MODIFIED", pod("a", "y")), "80M", ["a"], {"a": "y"}),
        # deletion is never patched, whatever its resourceVersion
        ([pod("a", 5), pod("b", 5)], ev("DELETED", pod("a", 6)), "80M", [], {"b": "5"}),
        ([pod("a", 5)], ev("DELETED", pod("z", 6)), "80M", [], {"a": "5"}),
        # terminating pods are cached, not patched
        ([pod("a", 5)], ev("MODIFIED", pod("a", 6, deleting=True)), "80M", [], {"a": "6"}),
        # BOOKMARK and ERROR change no pod
        (
            [pod("a", 5)],
            ev("BOOKMARK", {"metadata": {"resourceVersion": "99"}}),
            "80M",
            [],
            {"a": "5"},
        ),
        ([pod("a", 5)], ev("ERROR", {"kind": "Status", "code": 410}), "80M", [], {"a": "5"}),
        # an object without a name is ignored
        ([], ev("ADDED", {"metadata": {}, "status": {"phase": "Running"}}), "80M", [], {}),
    ],
)
def test_apply_event(
    cached: list[dict[str, Any]],
    event: WatchEvent,
    limit: str | None,
    to_patch: list[str],
    after: dict[str, str],
) -> None:
    cache = PodCache()
    cache.replace(cached)
    assert cache.apply_event(event, limit_value=limit) == to_patch
    assert {n: p["metadata"]["resourceVersion"] for n, p in cache.pods.items()} == after


def test_replace_reconcile_and_count() -> None:
    cache = PodCache()
    assert not cache.synced
    cache.replace(
        [
            pod("a", value="80M"),
            pod("b"),
            pod("c", value="60M"),
            pod("d", phase="Pending"),
            pod("e", deleting=True),
            {"metadata": {}},  # unnamed: dropped
        ]
    )
    assert cache.synced
    assert list(cache.pods) == ["a", "b", "c", "d", "e"]
    assert cache.reconcile("80M") == ["b", "c"]
    assert cache.reconcile(None) == []
    assert cache.carrying("80M") == 1
    assert cache.carrying(None) == 1  # b: Running without the annotation
    cache.replace([pod("b")])  # a re-list replaces, it does not merge
    assert list(cache.pods) == ["b"]


def test_put_and_discard() -> None:
    cache = PodCache()
    assert cache.put(pod("a", 5))
    assert not cache.put(pod("a", 4))  # older than what we hold
    assert cache.put(pod("a", 5, value="80M"))
    assert cache.pods["a"]["metadata"]["annotations"] == {EGRESS_ANNOTATION: "80M"}
    assert not cache.put({"metadata": {"resourceVersion": "9"}})
    cache.discard("a")
    cache.discard("a")  # twice is fine (a 404 after a DELETED)
    assert cache.pods == {}


# --- replaying sequences against a reference model ---------------------------------

NAMES = ("a", "b", "c")
VALUES = (None, "80M", "40M")

pods = st.builds(
    pod,
    st.sampled_from(NAMES),
    st.integers(1, 6),
    phase=st.sampled_from(("Running", "Pending")),
    value=st.sampled_from(VALUES),
    deleting=st.booleans(),
)
events = st.one_of(
    st.builds(ev, st.sampled_from(("ADDED", "MODIFIED", "DELETED")), pods),
    st.builds(
        ev,
        st.just("BOOKMARK"),
        st.builds(lambda rv: {"metadata": {"resourceVersion": rv}}, st.integers(1, 9).map(str)),
    ),
    st.just(ev("ERROR", {"kind": "Status", "code": 410})),
)


def reference(listed: list[dict[str, Any]], replay: list[WatchEvent]) -> dict[str, Any]:
    """Per name: the copy with the highest resourceVersion (the later one on a tie) among
    the list and the ADDED/MODIFIED events after that name's last DELETED."""
    out: dict[str, Any] = {}
    for name in NAMES:
        history = [p for p in listed if p["metadata"]["name"] == name]
        for e in replay:
            if e.type in ("ADDED", "MODIFIED", "DELETED") and e.object["metadata"]["name"] == name:
                history = [] if e.type == "DELETED" else [*history, e.object]
        if history:
            top = max(int(p["metadata"]["resourceVersion"]) for p in history)
            out[name] = [p for p in history if int(p["metadata"]["resourceVersion"]) == top][-1]
    return out


@given(
    st.lists(pods, max_size=4, unique_by=lambda p: p["metadata"]["name"]),
    st.lists(events, max_size=30),
    st.sampled_from(VALUES),
)
def test_replay_matches_the_reference_model(
    listed: list[dict[str, Any]], replay: list[WatchEvent], limit: str | None
) -> None:
    cache = PodCache()
    cache.replace(listed)
    for i, event in enumerate(replay):
        to_patch = cache.apply_event(event, limit_value=limit)
        model = reference(listed, replay[: i + 1])
        assert cache.pods == model
        # What to patch: this event's pod, exactly when its newest copy needs the limit.
        name = event.object.get("metadata", {}).get("name")
        wants = event.type in ("ADDED", "MODIFIED") and needs_limit(model[name], limit)
        assert to_patch == ([name] if wants else [])
    assert cache.reconcile(limit) == [n for n, p in cache.pods.items() if needs_limit(p, limit)]
    assert set(cache.reconcile(limit)) == {
        n
        for n, p in reference(listed, replay).items()
        if p["status"]["phase"] == "Running"
        and not p["metadata"].get("deletionTimestamp")
        and limit is not None
        and p["metadata"]["annotations"].get(EGRESS_ANNOTATION) != limit
    }
