"""A local stand-in of OpenAI's API: the webhook endpoints (``/v1/webhook_endpoints``) and
the ``GET`` of every object an event can name (``/v1/batches/{id}`` and the others of
:mod:`bridge.hydrate.mapping`).

Routes, request bodies and answers follow openai 3.57.0's ``webhooks`` resource and its
``WebhookEndpoint*`` types (``tests/test_endpoints.py`` drives it with the real SDK to keep
it so), and its retrieve methods for objects (``tests/test_hydrate.py``). ``test`` really
delivers a signed sample event to the endpoint's URL, signed with every secret OpenAI would
still accept, and reports the status it got back. Objects are answered with the exact
bytes a test stored; a test can have a path answer error statuses or answer late first.
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import secrets
import time
import uuid
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import aiohttp
from aiohttp import web
from yarl import URL

from bridge.endpoints import SUBSCRIBABLE_EVENT_TYPES
from bridge.hydrate.mapping import AGENTS_BETA_HEADER, HYDRATIONS
from bridge.signature import decode_secret, sign

OLD_SECRET_GRACE_SECONDS = 24 * 3600
LOOPBACK_HOSTS = frozenset({"127.0.0.1", "::1", "localhost"})


def new_signing_secret() -> str:
    return "whsec_" + base64.b64encode(secrets.token_bytes(32)).decode()


@dataclass
class StoredEndpoint:
    id: str
    name: str
    url: str
    event_types: list[str]
    created_at: int
    updated_at: int
    secret: str
    # (secret, valid until) of secrets replaced with keep_old_secret_active_for_24_hours.
    previous_secrets: list[tuple[str, float]] = field(default_factory=list)

    def as_json(self, *, with_secret: bool = False) -> dict[str, Any]:
        document: dict[str, Any] = {
            "id": self.id,
            "object": "webhook_endpoint",
            "created_at": self.created_at,
            "updated_at": self.updated_at,
            "name": self.name,
            "url": self.url,
            "event_types": self.event_types,
            "signing_secret_hint": f"whsec_...{self.secret[-4:]}",
        }
        if with_secret:
            document["signing_secret"] = self.secret
        return document

    def accepted_secrets(self, now: float) -> list[str]:
        return [self.secret] + [secret for secret, until in self.previous_secrets if until > now]


Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@dataclass
class OpenAIStandIn:
    """State of the stand-in; tests read and arrange it directly."""

    api_key: str = field(default_factory=lambda: "sk-test-" + secrets.token_hex(16))
    endpoints: dict[str, StoredEndpoint] = field(default_factory=dict)
    requests: list[tuple[str, str, Mapping[str, str]]] = field(default_factory=list)
    rate_limited_calls: int = 0
    retry_after: str = "7"
    clock: Callable[[], float] = time.time
    objects: dict[str, list[bytes]] = field(default_factory=dict)
    """Object bodies by API path (``/v1/batches/batch_x``): each call answers the next,
    and the last one from then on (a stale read, then the fresh one)."""
    failures: dict[str, list[int]] = field(default_factory=dict)
    """Statuses a path answers, one a call, before its object."""
    delays: dict[str, list[float]] = field(default_factory=dict)
    """Seconds a path's calls wait before answering, one a call."""
    any_object: bool = False
    """Answer a path with no object stored with a made-up one (a demonstration's events
    name objects nobody stored), ``status`` ``completed``."""
    any_key: bool = False
    """Take any bearer key (a demonstration has no key to share)."""
    other_api_keys: set[str] = field(default_factory=set)
    """Keys taken besides ``api_key`` (several projects' keys)."""

    def store_object(self, path: str, *bodies: bytes) -> None:
        self.objects[f"/v1{path}"] = list(bodies)

    def object_calls(self, path: str) -> int:
        return sum(
            1 for method, called, _ in self.requests if (method, called) == ("GET", f"/v1{path}")
        )

    def app(self) -> web.Application:
        app = web.Application(middlewares=[self._recorded, self._authenticated])
        app.router.add_get("/v1/webhook_endpoints", self._list)
        app.router.add_post("/v1/webhook_endpoints", self._create)
        app.router.add_get("/v1/webhook_endpoints/{id}", self._retrieve)
        app.router.add_post("/v1/webhook_endpoints/{id}", self._update)
        app.router.add_delete("/v1/webhook_endpoints/{id}", self._delete)
        app.router.add_post("/v1/webhook_endpoints/{id}/test", self._test)
        app.router.add_post("/v1/webhook_endpoints/{id}/rotate_secret", self._rotate_secret)
        for path in dict.fromkeys(hydration.path for hydration in HYDRATIONS):
            app.router.add_get("/v1" + path, self._object)
        return app

    def add_endpoint(self, *, name: str = "bridge", url: str = "https://example.test/") -> str:
        now = int(self.clock())
        endpoint = StoredEndpoint(
            id=f"we_{uuid.uuid4().hex[:24]}",
            name=name,
            url=url,
            event_types=list(SUBSCRIBABLE_EVENT_TYPES),
            created_at=now,
            updated_at=now,
            secret=new_signing_secret(),
        )
        self.endpoints[endpoint.id] = endpoint
        return endpoint.id

    @web.middleware
    async def _recorded(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        self.requests.append((request.method, request.path_qs, request.headers.copy()))
        return await handler(request)

    @web.middleware
    async def _authenticated(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        authorization = request.headers.get("Authorization", "")
        taken = {f"Bearer {key}" for key in (self.api_key, *self.other_api_keys)}
        if not (self.any_key and authorization.startswith("Bearer ")) and (
            authorization not in taken
        ):
            return _error(401, "Incorrect API key provided.", "invalid_api_key")
        if self.rate_limited_calls > 0:
            self.rate_limited_calls -= 1
            response = _error(429, "Rate limit reached for requests.", "rate_limit_exceeded")
            response.headers["retry-after"] = self.retry_after
            return response
        return await handler(request)

    def _endpoint(self, request: web.Request) -> StoredEndpoint:
        endpoint_id = request.match_info["id"]
        endpoint = self.endpoints.get(endpoint_id)
        if endpoint is None:
            raise _ErrorAnswer(404, f"No webhook endpoint found with id '{endpoint_id}'.")
        return endpoint

    async def _list(self, request: web.Request) -> web.Response:
        limit = int(request.query.get("limit", "20"))
        newest_first = sorted(
            self.endpoints.values(), key=lambda e: (e.created_at, e.id), reverse=True
        )
        after = request.query.get("after")
        if after is not None:
            ids = [endpoint.id for endpoint in newest_first]
            newest_first = newest_first[ids.index(after) + 1 :] if after in ids else []
        page = newest_first[:limit]
        return web.json_response(
            {
                "object": "list",
                "data": [endpoint.as_json() for endpoint in page],
                "first_id": page[0].id if page else None,
                "last_id": page[-1].id if page else None,
                "has_more": len(newest_first) > limit,
            }
        )

    async def _create(self, request: web.Request) -> web.Response:
        body = await _json_body(request)
        name, url = body.get("name"), body.get("url")
        if not isinstance(name, str) or not isinstance(url, str):
            raise _ErrorAnswer(400, "Missing required parameter: 'name' and 'url'.")
        now = int(self.clock())
        endpoint = StoredEndpoint(
            id=f"we_{uuid.uuid4().hex[:24]}",
            name=name,
            url=_https_url(url),
            event_types=_event_types(body.get("event_types")),
            created_at=now,
            updated_at=now,
            secret=new_signing_secret(),
        )
        self.endpoints[endpoint.id] = endpoint
        return web.json_response(endpoint.as_json(with_secret=True))

    async def _retrieve(self, request: web.Request) -> web.Response:
        return web.json_response(self._endpoint(request).as_json())

    async def _update(self, request: web.Request) -> web.Response:
        endpoint = self._endpoint(request)
        body = await _json_body(request)
        if "name" in body:
            endpoint.name = str(body["name"])
        if "url" in body:
            endpoint.url = _https_url(body["url"])
        if "event_types" in body:
            endpoint.event_types = _event_types(body["event_types"])
        endpoint.updated_at = int(self.clock())
        return web.json_response(endpoint.as_json())

    async def _delete(self, request: web.Request) -> web.Response:
        endpoint = self._endpoint(request)
        del self.endpoints[endpoint.id]
        return web.json_response(
            {"id": endpoint.id, "object": "webhook_endpoint.deleted", "deleted": True}
        )

    async def _rotate_secret(self, request: web.Request) -> web.Response:
        endpoint = self._endpoint(request)
        body = await _json_body(request)
        now = self.clock()
        if body.get("keep_old_secret_active_for_24_hours") is True:
            endpoint.previous_secrets.append((endpoint.secret, now + OLD_SECRET_GRACE_SECONDS))
        else:
            endpoint.previous_secrets.clear()
        endpoint.secret = new_signing_secret()
        endpoint.updated_at = int(now)
        return web.json_response(endpoint.as_json(with_secret=True))

    async def _test(self, request: web.Request) -> web.Response:
        endpoint = self._endpoint(request)
        event_type = (await _json_body(request)).get("event_type")
        if event_type not in SUBSCRIBABLE_EVENT_TYPES:
            raise _ErrorAnswer(400, f"Invalid value for 'event_type': {event_type!r}.")
        status = await self.deliver(endpoint, str(event_type))
        return web.json_response(
            {
                "object": "webhook_endpoint.test",
                "webhook_endpoint_id": endpoint.id,
                "event_type": event_type,
                "status_code": status,
                "success": True,
            }
        )

    async def _object(self, request: web.Request) -> web.Response:
        path = request.path
        if path.startswith("/v1/agents/"):
            [(name, value)] = AGENTS_BETA_HEADER.items()
            if value not in request.headers.get(name, ""):
                raise _ErrorAnswer(400, f"The Agents API needs the header {name}: {value}.")
        delays = self.delays.get(path)
        if delays:
            await asyncio.sleep(delays.pop(0))
        failures = self.failures.get(path)
        if failures:
            status = failures.pop(0)
            raise _ErrorAnswer(status, f"The stand-in answers {status} here.")
        bodies = self.objects.get(path)
        if not bodies and self.any_object:
            bodies = [_made_up_object(path, int(self.clock()))]
        if not bodies:
            raise _ErrorAnswer(404, f"No object found at '{path}'.")
        body = bodies.pop(0) if len(bodies) > 1 else bodies[0]
        return web.Response(body=body, content_type="application/json")

    async def deliver(self, endpoint: StoredEndpoint, event_type: str) -> int:
        """POST one signed sample event to the endpoint, as OpenAI's test delivery does.

        Tests send traffic only to loopback: any other URL is answered 400, unsent.
        """
        if URL(endpoint.url).host not in LOOPBACK_HOSTS:
            raise _ErrorAnswer(400, f"The stand-in delivers only to loopback, not {endpoint.url}.")
        now = int(self.clock())
        body = json.dumps(
            {
                "id": f"evt_{uuid.uuid4().hex}",
                "object": "event",
                "created_at": now,
                "type": event_type,
                "data": {"id": f"test_{uuid.uuid4().hex[:12]}"},
            }
        ).encode()
        webhook_id = f"wh_{uuid.uuid4().hex}"
        signatures = " ".join(
            sign(decode_secret(secret), webhook_id, now, body)
            for secret in endpoint.accepted_secrets(now)
        )
        headers = {
            "webhook-id": webhook_id,
            "webhook-timestamp": str(now),
            "webhook-signature": signatures,
            "content-type": "application/json",
        }
        try:
            async with (
                aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as session,
                session.post(endpoint.url, data=body, headers=headers) as response,
            ):
                return response.status
        except (aiohttp.ClientError, TimeoutError):
            return 0


_OBJECT_TYPES = {
    "batches": "batch",
    "responses": "response",
    "jobs": "fine_tuning.job",
    "videos": "video",
    "sessions": "agent.session",
    "environments": "agent.environment",
    "alerts": "safety.alert",
    "cases": "safety.case",
}


def _made_up_object(path: str, now: int) -> bytes:
    collection, object_id = path.rstrip("/").split("/")[-2:]
    document = {
        "id": object_id,
        "object": _OBJECT_TYPES[collection],
        "status": "completed",
        "created_at": now,
    }
    return json.dumps(document, indent=2).encode()


def main() -> None:
    """Serve the stand-in on ``STANDIN_PORT`` (default 9090), answering any key and any
    object id: the compose demonstration's OpenAI API."""
    state = OpenAIStandIn(any_object=True, any_key=True)
    web.run_app(
        state.app(),
        host="0.0.0.0",
        port=int(os.environ.get("STANDIN_PORT", "9090")),
    )


def _error_document(message: str, code: str | None) -> dict[str, Any]:
    return {
        "error": {"message": message, "type": "invalid_request_error", "param": None, "code": code}
    }


class _ErrorAnswer(web.HTTPException):
    def __init__(self, status: int, message: str, code: str | None = None) -> None:
        self.status_code = status
        super().__init__(
            text=json.dumps(_error_document(message, code)), content_type="application/json"
        )


def _error(status: int, message: str, code: str) -> web.Response:
    return web.json_response(_error_document(message, code), status=status)


async def _json_body(request: web.Request) -> dict[str, Any]:
    try:
        body = await request.json()
    except ValueError:
        raise _ErrorAnswer(400, "The request body is not valid JSON.") from None
    if not isinstance(body, dict):
        raise _ErrorAnswer(400, "The request body must be a JSON object.")
    return body


def _https_url(url: object) -> str:
    if not isinstance(url, str) or not url.startswith(("https://", "http://")):
        raise _ErrorAnswer(400, "Invalid 'url': must be an HTTPS URL.")
    return url


def _event_types(value: object) -> list[str]:
    if not isinstance(value, list) or not value:
        raise _ErrorAnswer(400, "Invalid 'event_types': expected a non-empty array.")
    unknown = [item for item in value if item not in SUBSCRIBABLE_EVENT_TYPES]
    if unknown:
        raise _ErrorAnswer(400, f"Invalid value for 'event_types': {unknown[0]!r}.")
    return [str(item) for item in value]


if __name__ == "__main__":
    main()
