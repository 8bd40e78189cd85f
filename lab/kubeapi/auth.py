"""Authentication as the emulated server answers it: a table of bearer tokens, filled by a
test (``add_token``) or by the TokenRequest API (``serviceaccounts/<name>/token``), and
the TokenReview answers built from it, in the real response shape.

A token authenticates when it is in the table, has not expired, every object it is bound
to (its ServiceAccount, its pod) still exists with the same uid, and its audiences meet
the audiences asked for (the server's own when the review names none). The answer then
carries ``status.audiences`` (that intersection) and ``status.user``; otherwise
``status.error`` says why and, as on the real server, ``authenticated`` is left out (Go's
``omitempty`` on false).
"""

from __future__ import annotations

import base64
import json
import os
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from detnet.lab.kubeapi.errors import ApiError

JsonObj = dict[str, Any]

DEFAULT_AUDIENCES = ("https://kubernetes.default.svc.cluster.local",)
ISSUER = "https://kubernetes.default.svc.cluster.local"
MAX_TOKENS = 10_000  # minted tokens beyond this evict the oldest
_SA_PREFIX = "system:serviceaccount:"


@dataclass(frozen=True)
class BoundObject:
    """An object a token dies with (deleted, or recreated with another uid)."""

    kind: str
    namespace: str
    name: str
    uid: str


@dataclass(frozen=True)
class Identity:
    """Who a token says its bearer is, and for which audiences until when."""

    username: str
    uid: str = ""
    groups: tuple[str, ...] = ()
    audiences: tuple[str, ...] = DEFAULT_AUDIENCES
    extra: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    expires_at: float | None = None  # time.time() seconds; None: never
    bound: tuple[BoundObject, ...] = ()


def default_groups(username: str) -> tuple[str, ...]:
    """The groups the real server gives a user: a ServiceAccount's three, or just
    ``system:authenticated``."""
    if username.startswith(_SA_PREFIX):
        namespace = username[len(_SA_PREFIX) :].split(":", 1)[0]
        return (
            "system:serviceaccounts",
            f"system:serviceaccounts:{namespace}",
            "system:authenticated",
        )
    return ("system:authenticated",)


def _go_quote(values: Sequence[str]) -> str:
    # Go's %q of a []string, as the real error message prints the audiences.
    return "[" + " ".join(json.dumps(v) for v in values) + "]"


class Tokens:
    """The bearer tokens the emulated server knows."""

    def __init__(self) -> None:
        self._table: dict[str, Identity] = {}

    def add(self, token: str, identity: Identity) -> None:
        """Know ``token`` as ``identity`` (replacing what it was)."""
        if not token:
            raise ValueError("a token must not be empty")
        self._table.pop(token, None)
        self._table[token] = identity
        while len(self._table) > MAX_TOKENS:
            del self._table[next(iter(self._table))]

    def revoke(self, token: str) -> None:
        """Forget ``token``: it no longer authenticates."""
        self._table.pop(token, None)

    def review(
        self,
        body: Any,
        *,
        api_audiences: Sequence[str],
        now: float,
        alive: Callable[[BoundObject], bool],
    ) -> JsonObj:
        """The TokenReview the server answers to a created ``body``."""
        spec = body.get("spec") if isinstance(body, dict) else None
        if (
            not isinstance(spec, dict)
            or not isinstance(spec.get("token"), str)
            or not spec["token"]
        ):
            raise ApiError(400, "token is required for TokenReview in authentication")
        wanted = spec.get("audiences") or list(api_audiences)
        if not isinstance(wanted, list) or not all(isinstance(a, str) for a in wanted):
            raise ApiError(400, "spec.audiences must be a list of strings")
        meta = dict(body.get("metadata") or {})
        meta["creationTimestamp"] = None
        answer: JsonObj = {
            "kind": "TokenReview",
            "apiVersion": "authentication.k8s.io/v1",
            "metadata": meta,
            "spec": spec,
        }
        identity = self._table.get(spec["token"])
        error = self._refusal(identity, wanted=wanted, now=now, alive=alive)
        if error is not None or identity is None:
            answer["status"] = {"user": {}, "error": error or "invalid bearer token"}
            return answer
        user: JsonObj = {"username": identity.username}
        if identity.uid:
            user["uid"] = identity.uid
        if identity.groups:
            user["groups"] = list(identity.groups)
        if identity.extra:
            user["extra"] = {k: list(v) for k, v in identity.extra.items()}
        answer["status"] = {
            "authenticated": True,
            "user": user,
            "audiences": [a for a in wanted if a in identity.audiences],
        }
        return answer

    @staticmethod
    def _refusal(
        identity: Identity | None,
        *,
        wanted: Sequence[str],
        now: float,
        alive: Callable[[BoundObject], bool],
    ) -> str | None:
        if identity is None:
            return "invalid bearer token"
        if identity.expires_at is not None and now >= identity.expires_at:
            return "invalid bearer token, service account token has expired"
        for obj in identity.bound:
            if not alive(obj):
                return (
                    f"invalid bearer token, {obj.kind.lower()} {json.dumps(obj.name)} "
                    f"(uid {obj.uid}) in namespace {json.dumps(obj.namespace)} is gone: "
                    "the token has been invalidated"
                )
        if not any(a in identity.audiences for a in wanted):
            return (
                f"invalid bearer token, token audiences {_go_quote(identity.audiences)} is "
                f"invalid for the target audiences {_go_quote(wanted)}"
            )
        return None


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def mint_jwt(*, claims: JsonObj) -> str:
    """A token shaped like the real server's (a JWT whose claims clients may read, e.g.
    ``exp``); its signature is random: only this emulator's table can vouch for it."""
    header = {"alg": "RS256", "kid": "detnet-kubeapi-emulator"}
    parts = [json.dumps(p, separators=(",", ":")).encode() for p in (header, claims)]
    return ".".join([_b64(parts[0]), _b64(parts[1]), _b64(os.urandom(64))])


def service_account_claims(
    *,
    namespace: str,
    account: JsonObj,
    audiences: Sequence[str],
    issued_at: int,
    expires_at: int,
    pod: JsonObj | None,
    node: JsonObj | None,
) -> tuple[JsonObj, Identity]:
    """The JWT claims and the identity of a token the TokenRequest API issues for
    ``account`` (bound to ``pod``, and to ``node`` when the pod runs on one)."""
    name, sa_uid = account["metadata"]["name"], account["metadata"]["uid"]
    jti = str(uuid.uuid4())
    username = f"{_SA_PREFIX}{namespace}:{name}"
    private: JsonObj = {"namespace": namespace, "serviceaccount": {"name": name, "uid": sa_uid}}
    extra: dict[str, tuple[str, ...]] = {
        "authentication.kubernetes.io/credential-id": (f"JTI={jti}",)
    }
    bound = [BoundObject("ServiceAccount", namespace, name, sa_uid)]
    for what, obj in (("pod", pod), ("node", node)):
        if obj is None:
            continue
        ref = {"name": obj["metadata"]["name"], "uid": obj["metadata"]["uid"]}
        private[what] = ref
        extra[f"authentication.kubernetes.io/{what}-name"] = (ref["name"],)
        extra[f"authentication.kubernetes.io/{what}-uid"] = (ref["uid"],)
        if what == "pod":
            bound.append(BoundObject("Pod", namespace, ref["name"], ref["uid"]))
    claims = {
        "aud": list(audiences),
        "exp": expires_at,
        "iat": issued_at,
        "iss": ISSUER,
        "jti": jti,
        "kubernetes.io": private,
        "nbf": issued_at,
        "sub": username,
    }
    identity = Identity(
        username=username,
        uid=sa_uid,
        groups=default_groups(username),
        audiences=tuple(audiences),
        extra=extra,
        expires_at=float(expires_at),
        bound=tuple(bound),
    )
    return claims, identity


def token_request(
    body: Any,
    *,
    account: JsonObj,
    find_pod: Callable[[str], JsonObj],
    find_node: Callable[[str], JsonObj | None],
    api_audiences: Sequence[str],
    now: float,
) -> tuple[JsonObj, str, Identity]:
    """Answer a TokenRequest for ``account`` (``serviceaccounts/<name>/token``): a token
    for ``spec.audiences`` (default the server's), valid for ``spec.expirationSeconds``
    (default 3600, at least 600), bound to the pod ``spec.boundObjectRef`` names (and so
    to its node). Returns the answer, the token and its identity."""
    name, namespace = account["metadata"]["name"], account["metadata"]["namespace"]
    spec = dict(body.get("spec") or {}) if isinstance(body, dict) else {}
    seconds = spec.get("expirationSeconds") or 3600
    invalid = (
        f'TokenRequest.authentication.k8s.io "{name}" is invalid: '
        f"spec.expirationSeconds: Invalid value: {seconds}: "
    )
    if not isinstance(seconds, int) or seconds < 600:
        raise ApiError(422, invalid + "may not specify a duration less than 10 minutes")
    if seconds > 2**32:
        raise ApiError(422, invalid + "may not specify a duration larger than 2^32 seconds")
    audiences = spec.get("audiences") or list(api_audiences)
    pod = node = None
    ref = spec.get("boundObjectRef")
    if ref:
        if ref.get("kind") != "Pod":
            kind = ref.get("kind")
            raise ApiError(400, f"cannot bind a token to a {kind!r}: the emulation binds to pods")
        pod = find_pod(str(ref.get("name", "")))
        if ref.get("uid") and ref["uid"] != pod["metadata"]["uid"]:
            raise ApiError(
                409,
                f"the UID in the bound object reference ({ref['uid']}) does not match the UID "
                "in record. The object might have been deleted and then recreated",
            )
        node_name = (pod.get("spec") or {}).get("nodeName")
        node = find_node(node_name) if node_name else None
    issued = int(now)
    claims, identity = service_account_claims(
        namespace=namespace,
        account=account,
        audiences=audiences,
        issued_at=issued,
        expires_at=issued + seconds,
        pod=pod,
        node=node,
    )
    token = mint_jwt(claims=claims)
    stamp = "%Y-%m-%dT%H:%M:%SZ"
    answer = {
        "kind": "TokenRequest",
        "apiVersion": "authentication.k8s.io/v1",
        "metadata": {
            "name": name,
            "namespace": namespace,
            "creationTimestamp": datetime.fromtimestamp(issued, UTC).strftime(stamp),
        },
        "spec": {**spec, "audiences": audiences, "expirationSeconds": seconds},
        "status": {
            "token": token,
            "expirationTimestamp": datetime.fromtimestamp(issued + seconds, UTC).strftime(stamp),
        },
    }
    return answer, token, identity
