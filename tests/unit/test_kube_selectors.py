"""Label selectors (controller/kube/selectors.py): apimachinery's grammar and matching,
checked against a table, and against the API server emulation's matcher where both
define the answer."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from detnet.controller.kube.selectors import (
    MAX_SELECTOR_CHARS,
    Requirement,
    SelectorError,
    parse_selector,
)
from detnet.lab.kubeapi import selector_matches

WEB = {"app": "web", "tier": "frontend", "version": "3"}


@pytest.mark.parametrize(
    ("selector", "labels", "expected"),
    [
        ("", WEB, True),
        ("app=web", WEB, True),
        ("app==web", WEB, True),
        ("app = web", WEB, True),
        ("app=db", WEB, False),
        ("app!=db", WEB, True),
        ("app!=web", WEB, False),
        ("missing!=x", WEB, True),  # != matches an absent key, as on the server
        ("app", WEB, True),
        ("missing", WEB, False),
        ("!missing", WEB, True),
        ("!app", WEB, False),
        ("! app", WEB, False),
        ("app in (web,db)", WEB, True),
        ("app in (db)", WEB, False),
        ("app notin (db,cache)", WEB, True),
        ("app notin (web)", WEB, False),
        ("missing notin (web)", WEB, True),
        ("missing in (web)", WEB, False),
        ("app=web,tier=frontend", WEB, True),
        ("app=web,tier=backend", WEB, False),
        ("app=web, tier in (frontend), !canary", WEB, True),
        ("version>2", WEB, True),
        ("version>3", WEB, False),
        ("version<4", WEB, True),
        ("app>1", WEB, False),  # not an integer label: no match
        ("missing<5", WEB, False),
        ("app.kubernetes.io/name=web", {"app.kubernetes.io/name": "web"}, True),
        ("empty=", {"empty": ""}, True),
        ("empty=", {"empty": "x"}, False),
        ("app in (web,)", {"app": ""}, True),  # "web," reads an empty value too
    ],
)
def test_matching(selector: str, labels: dict[str, str], expected: bool) -> None:
    assert parse_selector(selector).matches(labels) is expected


def test_parsed_form() -> None:
    sel = parse_selector("a=1,!b,c in (x, y),d>7")
    assert sel.requirements == (
        Requirement("a", "=", frozenset({"1"})),
        Requirement("b", "!exists"),
        Requirement("c", "in", frozenset({"x", "y"})),
        Requirement("d", ">", frozenset({"7"})),
    )
    assert parse_selector("").empty
    assert not sel.empty


@pytest.mark.parametrize(
    ("selector", "message"),
    [
        ("app=web,", "ends with ','"),
        ("app=web tier=x", "expected ','"),
        ("=web", "expected a label key"),
        ("app in web", "parenthesised list"),
        ("app in ()", "at least one value"),
        ("app in (a b)", "unexpected"),
        ("app in (a", "ends in the middle"),
        ("app>x", "needs an integer"),
        ("-app=web", "label key"),
        ("app=-web", "label value"),
        ("Bad_Prefix.io/app=web", "DNS subdomain"),
        ("a/b/c=d", "DNS subdomain"),
        ("app=" + "v" * 64, "label value"),
        ("k" * 64 + "=v", "label key"),
        ("app in", "ends in the middle"),
        ("!", "ends in the middle"),
        ("in=1", "expected a label key"),
    ],
)
def test_bad_selectors_say_what_is_wrong(selector: str, message: str) -> None:
    with pytest.raises(SelectorError, match=message):
        parse_selector(selector)


def test_an_oversized_selector_is_refused_unread() -> None:
    with pytest.raises(SelectorError, match="longer than"):
        parse_selector("a=b," * (MAX_SELECTOR_CHARS // 4 + 1))


_key = st.sampled_from(["app", "tier", "x.io/name"])
_val = st.sampled_from(["web", "db", "a1"])
_req = st.one_of(
    st.builds(lambda k, v: f"{k}={v}", _key, _val),
    st.builds(lambda k, v: f"{k}!={v}", _key, _val),
    st.builds(lambda k: k, _key),
    st.builds(lambda k: f"!{k}", _key),
    st.builds(lambda k, vs: f"{k} in ({','.join(vs)})", _key, st.lists(_val, min_size=1)),
    st.builds(lambda k, vs: f"{k} notin ({','.join(vs)})", _key, st.lists(_val, min_size=1)),
)


@given(
    reqs=st.lists(_req, max_size=4),
    labels=st.dictionaries(_key, _val, max_size=3),
)
def test_agrees_with_the_emulated_api_server(reqs: list[str], labels: dict[str, str]) -> None:
    selector = ",".join(reqs)
    assert parse_selector(selector).matches(labels) == selector_matches(selector, labels)
