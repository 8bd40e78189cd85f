"""Who may read /v1/usage (controller/agent/auth.py): 401/403/200/503 decisions, the
TokenReview cache (positive, negative, expiry, bound), shared reviews, the in-flight
bound; TokenReview responses in the real server's shape (the emulator's)."""

from __future__ import annotations

import asyncio
import base64
import json

import pytest

from detnet.controller.agent.auth import (
    AuthDecision,
    Authenticator,
    Review,
    ReviewCache,
    ReviewUnavailable,
    parse_account,
    review_from_response,
    service_account,
    token_expiry,
)
from detnet.engine.parse import ParseError
from detnet.lab.kubeapi.auth import Identity, Tokens

CONTROLLER = "system:serviceaccount:detnet-system:detnet-controller"
OTHER = "system:serviceaccount:default:default"


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class Reviewer:
    """Answers from a table; counts the reviews."""

    def __init__(self, table: dict[str, Review]) -> None:
        self.table = table
        self.calls: list[str] = []
        self.gate: asyncio.Event | None = None
        self.fail: BaseException | None = None

    async def __call__(self, token: str) -> Review:
        self.calls.append(token)
        if self.gate is not None:
            await self.gate.wait()
        if self.fail is not None:
            raise self.fail
        return self.table.get(token, Review(authenticated=False, error="invalid bearer token"))


def jwt(exp: float | None) -> str:
    payload = {"iss": "kubernetes", **({"exp": exp} if exp is not None else {})}
    body = base64.urlsafe_b64encode(json.dumps(payload).encode()).rstrip(b"=").decode()
    return f"eyJhbGciOiJSUzI1NiJ9.{body}.c2lnbmF0dXJl"


def make(
    table: dict[str, Review], **kwargs: object
) -> tuple[Authenticator, Reviewer, FakeClock, FakeClock]:
    reviewer, clock, wall = Reviewer(table), FakeClock(), FakeClock()
    auth = Authenticator(review=reviewer, clock=clock, wall=wall, **kwargs)  # type: ignore[arg-type]
    return auth, reviewer, clock, wall


TABLE = {
    "ctl": Review(authenticated=True, username=CONTROLLER),
    "other": Review(authenticated=True, username=OTHER),
    "human": Review(authenticated=True, username="alice@example.com"),
}


@pytest.mark.parametrize(
    ("header", "status", "reason"),
    [
        (None, 401, "no_token"),
        ("", 401, "no_token"),
        ("Basic dXNlcjpwYXNz", 401, "malformed"),
        ("Bearer", 401, "malformed"),
        ("Bearer ", 401, "malformed"),
        ("Bearer a b", 401, "malformed"),
        ("Bearer tok\x00en", 401, "malformed"),
        ("Bearer " + "x" * 20_000, 401, "malformed"),
        ("Bearer nobody-knows-me", 401, "invalid"),
        ("Bearer other", 403, "forbidden"),
        ("Bearer human", 403, "forbidden"),  # not a service account at all
        ("Bearer ctl", 200, "ok"),
        ("bearer ctl", 200, "ok"),  # the scheme is case-insensitive
    ],
)
async def test_decisions(header: str | None, status: int, reason: str) -> None:
    auth, reviewer, _, _ = make(TABLE)
    decision = await auth.authenticate(header)
    assert (decision.status, decision.reason) == (status, reason)
    assert auth.counts[reason] == 1
    if reason in ("no_token", "malformed"):
        assert reviewer.calls == []  # never sent to the API server


async def test_the_allow_list_names_accounts() -> None:
    auth, _, _, _ = make(TABLE, allow={("default", "default")})
    assert (await auth.authenticate("Bearer other")).status == 200
    assert (await auth.authenticate("Bearer ctl")).status == 403
    assert (await auth.authenticate("Bearer other")).subject == "default:default"


async def test_a_yes_is_cached_for_the_positive_ttl() -> None:
    auth, reviewer, clock, _ = make(TABLE, positive_ttl_s=30.0)
    for _ in range(5):
        assert (await auth.authenticate("Bearer ctl")).status == 200
    assert reviewer.calls == ["ctl"]
    assert auth.cache_hits == 4
    clock.now += 29.9
    await auth.authenticate("Bearer ctl")
    assert len(reviewer.calls) == 1
    clock.now += 0.2
    await auth.authenticate("Bearer ctl")
    assert len(reviewer.calls) == 2


async def test_a_no_is_cached_for_the_negative_ttl() -> None:
    auth, reviewer, clock, _ = make(TABLE, negative_ttl_s=5.0)
    for _ in range(3):
        assert (await auth.authenticate("Bearer bad")).status == 401
    assert reviewer.calls == ["bad"]
    clock.now += 5.0
    await auth.authenticate("Bearer bad")
    assert reviewer.calls == ["bad", "bad"]


async def test_a_forbidden_account_is_cached_too() -> None:
    auth, reviewer, _, _ = make(TABLE)
    for _ in range(3):
        assert (await auth.authenticate("Bearer other")).status == 403
    assert reviewer.calls == ["other"]


async def test_a_yes_never_outlives_the_tokens_own_expiry() -> None:
    soon = jwt(exp=1000.0 + 3.0)  # the wall clock reads 1000
    auth, reviewer, clock, wall = make({soon: TABLE["ctl"]}, positive_ttl_s=30.0)
    await auth.authenticate(f"Bearer {soon}")
    clock.now += 2.9
    await auth.authenticate(f"Bearer {soon}")
    assert len(reviewer.calls) == 1
    clock.now += 0.2
    wall.now += 3.1
    await auth.authenticate(f"Bearer {soon}")
    assert len(reviewer.calls) == 2


async def test_an_api_server_failure_is_503_and_not_cached() -> None:
    auth, reviewer, _, _ = make(TABLE)
    reviewer.fail = ReviewUnavailable("API server unreachable")
    assert await auth.authenticate("Bearer ctl") == AuthDecision(503, "unavailable")
    reviewer.fail = None
    assert (await auth.authenticate("Bearer ctl")).status == 200
    assert reviewer.calls == ["ctl", "ctl"]


async def test_a_review_that_hangs_times_out_as_503() -> None:
    auth, reviewer, _, _ = make(TABLE, review_timeout_s=0.05)
    reviewer.gate = asyncio.Event()  # never set
    assert (await auth.authenticate("Bearer ctl")).reason == "unavailable"


async def test_concurrent_requests_with_one_token_share_one_review() -> None:
    auth, reviewer, _, _ = make(TABLE)
    reviewer.gate = asyncio.Event()
    pending = [asyncio.create_task(auth.authenticate("Bearer ctl")) for _ in range(5)]
    await asyncio.sleep(0)
    reviewer.gate.set()
    assert [d.status for d in await asyncio.gather(*pending)] == [200] * 5
    assert reviewer.calls == ["ctl"]


async def test_a_caller_going_away_does_not_cancel_the_shared_review() -> None:
    auth, reviewer, _, _ = make(TABLE)
    reviewer.gate = asyncio.Event()
    first = asyncio.create_task(auth.authenticate("Bearer ctl"))
    second = asyncio.create_task(auth.authenticate("Bearer ctl"))
    await asyncio.sleep(0)
    first.cancel()
    reviewer.gate.set()
    assert (await second).status == 200
    with pytest.raises(asyncio.CancelledError):
        await first


async def test_reviews_in_flight_are_bounded() -> None:
    auth, reviewer, _, _ = make(TABLE, max_in_flight=2)
    reviewer.gate = asyncio.Event()
    slow = [asyncio.create_task(auth.authenticate(f"Bearer t{i}")) for i in range(2)]
    await asyncio.sleep(0)
    assert await auth.authenticate("Bearer t3") == AuthDecision(503, "busy")
    reviewer.gate.set()
    assert [d.status for d in await asyncio.gather(*slow)] == [401, 401]
    assert len(reviewer.calls) == 2


def test_the_cache_is_bounded_least_recently_used_first() -> None:
    cache = ReviewCache(max_entries=2)
    yes = Review(authenticated=True, username=CONTROLLER)
    cache.put(b"a", yes, now=0, ttl_s=10)
    cache.put(b"b", yes, now=0, ttl_s=10)
    assert cache.get(b"a", now=1) is yes  # a is now the most recent
    cache.put(b"c", yes, now=1, ttl_s=10)
    assert len(cache) == 2
    assert cache.get(b"b", now=1) is None
    assert cache.get(b"a", now=1) is yes
    assert cache.get(b"a", now=10) is None  # expired
    cache.put(b"d", yes, now=1, ttl_s=-1)  # an expired token: not kept
    assert cache.get(b"d", now=1) is None


def test_an_empty_allow_list_is_refused() -> None:
    with pytest.raises(ValueError, match="allow list is empty"):
        Authenticator(review=Reviewer({}), allow=())


# ------------------------------------------------------- TokenReview responses


def _emulated(token: str, identity: Identity | None, audiences: list[str]) -> dict[str, object]:
    tokens = Tokens()
    if identity is not None:
        tokens.add(token, identity)
    body = {"spec": {"token": token, "audiences": audiences}}
    return tokens.review(
        body, api_audiences=["https://kubernetes.default.svc"], now=0, alive=lambda b: True
    )


def test_review_of_a_real_shaped_response() -> None:
    ident = Identity(username=CONTROLLER, audiences=("detnet-agent",))
    ok = _emulated("t", ident, ["detnet-agent"])
    assert review_from_response(ok, audience="detnet-agent") == Review(True, CONTROLLER)
    # A token for the API server only: the emulator (like the real server) says no.
    api_only = Identity(username=CONTROLLER, audiences=("https://kubernetes.default.svc",))
    refused = review_from_response(
        _emulated("t", api_only, ["detnet-agent"]), audience="detnet-agent"
    )
    assert not refused.authenticated
    assert "audiences" in refused.error
    unknown = review_from_response(_emulated("t", None, ["detnet-agent"]), audience="detnet-agent")
    assert unknown == Review(False, "", "invalid bearer token")


@pytest.mark.parametrize(
    "response",
    [
        {},
        {"status": "yes"},
        {"status": {"authenticated": "true", "user": {"username": CONTROLLER}}},
        # an audience-unaware server answers without audiences: not proof enough
        {"status": {"authenticated": True, "user": {"username": CONTROLLER}}},
        {"status": {"authenticated": True, "user": {"username": CONTROLLER}, "audiences": ["x"]}},
        {"status": {"authenticated": True, "audiences": ["detnet-agent"]}},
        {
            "status": {
                "authenticated": True,
                "user": {"username": ""},
                "audiences": ["detnet-agent"],
            }
        },
    ],
)
def test_anything_less_than_a_clear_yes_is_a_no(response: dict[str, object]) -> None:
    assert not review_from_response(response, audience="detnet-agent").authenticated


def test_service_account_names() -> None:
    assert service_account(CONTROLLER) == ("detnet-system", "detnet-controller")
    assert service_account("system:serviceaccount:ns") is None
    assert service_account("system:serviceaccount::name") is None
    assert service_account("system:serviceaccount:a:b:c") is None
    assert service_account("system:node:node-a") is None


def test_parse_account() -> None:
    assert parse_account("detnet-system:detnet-controller") == (
        "detnet-system",
        "detnet-controller",
    )
    for bad in ("", "detnet-system", ":x", "x:", "Upper:x", "a:b:c", "a b:c"):
        with pytest.raises(ParseError, match="NAMESPACE:SERVICEACCOUNT"):
            parse_account(bad)


def test_token_expiry_reads_only_a_jwts_exp() -> None:
    assert token_expiry(jwt(exp=1234.5)) == 1234.5
    assert token_expiry(jwt(exp=None)) is None
    assert token_expiry("opaque-token") is None
    assert token_expiry("a.!!!.c") is None
    assert token_expiry("a." + base64.urlsafe_b64encode(b"[1]").decode() + ".c") is None
