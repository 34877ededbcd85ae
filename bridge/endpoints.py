"""OpenAI's webhook-endpoint API (``/v1/webhook_endpoints``): list, create, update, delete,
send a test delivery and rotate the signing secret.

Configured like OpenAI's SDK (``OPENAI_API_KEY``, ``OPENAI_BASE_URL``, ``OPENAI_ORG_ID``,
``OPENAI_PROJECT_ID``), spoken over aiohttp so the bridge needs no SDK. Every call has a
deadline, and every refusal is an :class:`OpenAIApiError` whose :meth:`~OpenAIApiError.line`
is one line for an operator. A signing secret is received only by ``create`` and
``rotate_secret``: it is a :class:`~pydantic.SecretStr`, for :mod:`bridge.secrets` to write
to a file, never for printing.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from types import TracebackType
from typing import Any, Literal, Self, TypeVar
from urllib.parse import quote

import aiohttp
from pydantic import BaseModel, ConfigDict, SecretStr, ValidationError
from yarl import URL

from bridge.secrets import SecretDestination, SecretNotWritten

DEFAULT_BASE_URL = "https://api.openai.com/v1"
DEFAULT_TIMEOUT = 30.0
PAGE_SIZE = 100
MAX_PAGES = 100
_MAX_MESSAGE_LENGTH = 300
_LOOPBACK_HOSTS = frozenset({"127.0.0.1", "::1", "localhost"})

# The event types OpenAI accepts for an endpoint, as openai 3.57.0's WebhookCreateParams
# lists them (tests/test_endpoints.py holds the two lists together).
SUBSCRIBABLE_EVENT_TYPES = (
    "batch.completed",
    "batch.failed",
    "batch.expired",
    "batch.cancelled",
    "response.completed",
    "response.failed",
    "response.cancelled",
    "response.incomplete",
    "eval.run.succeeded",
    "eval.run.failed",
    "eval.run.canceled",
    "fine_tuning.job.succeeded",
    "fine_tuning.job.failed",
    "fine_tuning.job.cancelled",
    "realtime.call.incoming",
    "video.completed",
    "video.failed",
    "agent.environment.ready",
    "agent.environment.failed",
    "agent.environment.suspended",
    "agent.environment.expired",
    "agent.session.created",
    "agent.session.action_required",
    "agent.session.in_progress",
    "agent.session.idle",
    "agent.session.failed",
    "safety.alert.created",
)


class EndpointsConfigError(Exception):
    """The OpenAI API cannot be called as configured (no API key, a bad base URL)."""


class OpenAIApiError(Exception):
    """OpenAI refused a call, or could not be reached in time."""

    def __init__(self, reason: str, *, status: int | None = None) -> None:
        super().__init__(reason)
        self.status = status

    def line(self) -> str:
        return str(self)


class _Response(BaseModel):
    model_config = ConfigDict(extra="allow", frozen=True)


class WebhookEndpoint(_Response):
    id: str
    created_at: int
    event_types: list[str]
    name: str
    object: Literal["webhook_endpoint"]
    signing_secret_hint: str | None = None
    url: str
    updated_at: int | None = None


class WebhookEndpointWithSecret(WebhookEndpoint):
    signing_secret: SecretStr


class WebhookEndpointList(_Response):
    data: list[WebhookEndpoint]
    first_id: str | None = None
    has_more: bool
    last_id: str | None = None
    object: Literal["list"]


class WebhookEndpointTestResult(_Response):
    event_type: str
    object: Literal["webhook_endpoint.test"]
    status_code: int
    success: bool
    webhook_endpoint_id: str


class DeletedWebhookEndpoint(_Response):
    id: str
    deleted: bool
    object: Literal["webhook_endpoint.deleted"]


Model = TypeVar("Model", bound=_Response)


@dataclass(frozen=True, slots=True)
class ApiConfig:
    api_key: SecretStr
    base_url: str = DEFAULT_BASE_URL
    organization: str | None = None
    project: str | None = None
    timeout: float = DEFAULT_TIMEOUT

    @classmethod
    def from_environment(
        cls, environment: Mapping[str, str], *, timeout: float = DEFAULT_TIMEOUT
    ) -> ApiConfig:
        api_key = environment.get("OPENAI_API_KEY", "").strip()
        if not api_key:
            raise EndpointsConfigError(
                "OPENAI_API_KEY is not set: give it an API key of the project that owns the "
                "webhook endpoints"
            )
        base_url = environment.get("OPENAI_BASE_URL", "").strip() or DEFAULT_BASE_URL
        url = URL(base_url)
        if not url.host or url.scheme not in ("https", "http"):
            raise EndpointsConfigError("OPENAI_BASE_URL must be an https:// URL")
        if url.scheme == "http" and url.host not in _LOOPBACK_HOSTS:
            # The API key would cross the network in clear.
            raise EndpointsConfigError("OPENAI_BASE_URL must be https:// except on loopback")
        return cls(
            api_key=SecretStr(api_key),
            base_url=base_url.rstrip("/"),
            organization=environment.get("OPENAI_ORG_ID") or None,
            project=environment.get("OPENAI_PROJECT_ID") or None,
            timeout=timeout,
        )

    def headers(self) -> dict[str, str]:
        headers = {
            "Authorization": f"Bearer {self.api_key.get_secret_value()}",
            "Accept": "application/json",
            "User-Agent": "openai-webhook-bridge",
        }
        if self.organization:
            headers["OpenAI-Organization"] = self.organization
        if self.project:
            headers["OpenAI-Project"] = self.project
        return headers


class EndpointsClient:
    """``async with EndpointsClient(config) as client:`` then one method per API route."""

    def __init__(self, config: ApiConfig) -> None:
        self._config = config
        self._session: aiohttp.ClientSession | None = None

    async def __aenter__(self) -> Self:
        self._session = aiohttp.ClientSession(
            headers=self._config.headers(),
            timeout=aiohttp.ClientTimeout(total=self._config.timeout),
        )
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        if self._session is not None:
            await self._session.close()

    async def list(self) -> list[WebhookEndpoint]:
        """Every endpoint of the project, newest first, following the pages."""
        endpoints: list[WebhookEndpoint] = []
        after: str | None = None
        for _ in range(MAX_PAGES):
            query = {"limit": str(PAGE_SIZE)} | ({"after": after} if after else {})
            page = await self._call("GET", "", WebhookEndpointList, query=query)
            endpoints += page.data
            after = page.last_id or (page.data[-1].id if page.data else None)
            if not page.has_more or after is None:
                return endpoints
        raise OpenAIApiError(f"more than {MAX_PAGES * PAGE_SIZE} webhook endpoints; stopped")

    async def create(
        self, *, url: str, name: str, event_types: Sequence[str]
    ) -> WebhookEndpointWithSecret:
        body = {"event_types": list(event_types), "name": name, "url": url}
        return await self._call("POST", "", WebhookEndpointWithSecret, body=body)

    async def update(
        self,
        endpoint_id: str,
        *,
        url: str | None = None,
        name: str | None = None,
        event_types: Sequence[str] | None = None,
    ) -> WebhookEndpoint:
        changes = {
            "event_types": None if event_types is None else list(event_types),
            "name": name,
            "url": url,
        }
        body = {key: value for key, value in changes.items() if value is not None}
        return await self._call("POST", _item(endpoint_id), WebhookEndpoint, body=body)

    async def delete(self, endpoint_id: str) -> DeletedWebhookEndpoint:
        return await self._call("DELETE", _item(endpoint_id), DeletedWebhookEndpoint)

    async def test(self, endpoint_id: str, *, event_type: str) -> WebhookEndpointTestResult:
        return await self._call(
            "POST",
            f"{_item(endpoint_id)}/test",
            WebhookEndpointTestResult,
            body={"event_type": event_type},
        )

    async def rotate_secret(self, endpoint_id: str, *, keep_old: bool) -> WebhookEndpointWithSecret:
        return await self._call(
            "POST",
            f"{_item(endpoint_id)}/rotate_secret",
            WebhookEndpointWithSecret,
            body={"keep_old_secret_active_for_24_hours": keep_old},
        )

    async def _call(
        self,
        method: str,
        path: str,
        model: type[Model],
        *,
        body: Mapping[str, Any] | None = None,
        query: Mapping[str, str] | None = None,
    ) -> Model:
        if self._session is None:
            raise RuntimeError("use EndpointsClient in an `async with` block")
        url = f"{self._config.base_url}/webhook_endpoints{path}"
        try:
            # The session's timeout covers each request; this one also covers reading the body.
            async with (
                asyncio.timeout(self._config.timeout),
                self._session.request(method, url, json=body, params=query) as response,
            ):
                payload = await response.read()
                if response.status >= 400:
                    raise _refusal(response.status, response.headers, payload)
        except TimeoutError:
            raise OpenAIApiError(
                f"OpenAI did not answer {method} {url} within {self._config.timeout:g} s"
            ) from None
        except aiohttp.ClientError as error:
            reason = str(error) or type(error).__name__
            raise OpenAIApiError(f"cannot reach OpenAI at {url}: {reason}") from None
        try:
            return model.model_validate_json(payload)
        except ValidationError:
            raise OpenAIApiError(
                f"OpenAI answered {method} {url} with JSON that is not a {model.__name__}",
                status=response.status,
            ) from None


OLD_SECRET_GRACE = timedelta(hours=24)


@dataclass(frozen=True, slots=True)
class InstalledSecret:
    """A new signing secret, written to ``path`` (and nowhere else) with ``secret_count``
    secrets in all; ``old_valid_until`` is when OpenAI stops accepting the previous one."""

    endpoint: WebhookEndpoint
    path: Path
    secret_count: int
    old_valid_until: datetime | None


async def create_endpoint(
    client: EndpointsClient,
    destination: SecretDestination,
    *,
    url: str,
    name: str,
    event_types: Sequence[str],
) -> InstalledSecret:
    """Create an endpoint and write its signing secret alone to ``destination``."""
    destination.secrets_to_keep(keep_old=False)
    endpoint = await client.create(url=url, name=name, event_types=event_types)
    count = _install(destination, endpoint, [], then="delete the endpoint and create it again")
    return InstalledSecret(endpoint, destination.path, count, None)


async def rotate_endpoint_secret(
    client: EndpointsClient,
    destination: SecretDestination,
    endpoint_id: str,
    *,
    keep_old: bool,
    clock: Callable[[], float] = time.time,
) -> InstalledSecret:
    """Rotate the signing secret; the new one goes first in ``destination`` and, with
    ``keep_old``, the secrets already there stay after it."""
    kept = destination.secrets_to_keep(keep_old=keep_old)
    endpoint = await client.rotate_secret(endpoint_id, keep_old=keep_old)
    count = _install(destination, endpoint, kept, then="rotate it again")
    rotated_at = datetime.fromtimestamp(endpoint.updated_at or clock(), tz=UTC)
    return InstalledSecret(
        endpoint, destination.path, count, rotated_at + OLD_SECRET_GRACE if keep_old else None
    )


def _install(
    destination: SecretDestination,
    endpoint: WebhookEndpointWithSecret,
    kept: Sequence[str],
    *,
    then: str,
) -> int:
    try:
        return destination.install(endpoint.signing_secret.get_secret_value(), kept)
    except OSError as error:
        raise SecretNotWritten(
            f"OpenAI made a new signing secret for {endpoint.id} but writing it to "
            f"{destination.path} failed ({error.strerror or type(error).__name__}): "
            f"{then} once the file can be written"
        ) from None


def _item(endpoint_id: str) -> str:
    if not endpoint_id:
        raise OpenAIApiError("the webhook endpoint id is empty")
    return "/" + quote(endpoint_id, safe="")


def _refusal(status: int, headers: Mapping[str, str], payload: bytes) -> OpenAIApiError:
    message = _error_message(payload)
    if status == 401:
        return OpenAIApiError(
            f"OpenAI refused the API key (401): {message}; check OPENAI_API_KEY", status=status
        )
    if status == 403:
        return OpenAIApiError(
            f"not allowed (403): {message}; check the key's project and permissions",
            status=status,
        )
    if status == 404:
        return OpenAIApiError(f"not found (404): {message}", status=status)
    if status == 429:
        return OpenAIApiError(
            f"rate limited by OpenAI (429): {message}; {_retry_hint(headers)}", status=status
        )
    if status >= 500:
        return OpenAIApiError(f"OpenAI failed ({status}): {message}; try again", status=status)
    return OpenAIApiError(f"OpenAI refused the request ({status}): {message}", status=status)


def _error_message(payload: bytes) -> str:
    """OpenAI's ``{"error": {"message": ...}}``, or the start of whatever else came, one line."""
    message: object = None
    with contextlib.suppress(ValueError):
        document = json.loads(payload)
        if isinstance(document, dict) and isinstance(document.get("error"), dict):
            message = document["error"].get("message")
    if not isinstance(message, str) or not message.strip():
        message = payload.decode("utf-8", errors="replace").strip() or "no message"
    single_line = " ".join(str(message).split())
    if len(single_line) > _MAX_MESSAGE_LENGTH:
        return single_line[:_MAX_MESSAGE_LENGTH] + "..."
    return single_line


def _retry_hint(headers: Mapping[str, str]) -> str:
    """What OpenAI said about when to retry (``retry-after-ms`` or ``retry-after``)."""
    with contextlib.suppress(ValueError):
        milliseconds = headers.get("retry-after-ms")
        if milliseconds is not None:
            return f"retry after {float(milliseconds) / 1000:g} s"
    with contextlib.suppress(ValueError):
        seconds = headers.get("retry-after")
        if seconds is not None:
            return f"retry after {float(seconds):g} s"
    retry_after = headers.get("retry-after")
    if retry_after:
        return f"retry after {' '.join(retry_after.split())[:64]}"
    return "retry later (OpenAI gave no retry-after)"
