"""Fetching objects through openai-python, keeping the exact bytes the API answered.

Each call goes through the SDK's raw-response API (``client.batches.with_raw_response
.retrieve(id)``): the SDK knows the path, the ``OpenAI-Beta`` header of the agents
endpoints, authentication and how errors look, and the raw response keeps the body as
the API sent it. The SDK's own retries are off (``max_retries=0``): its back-off sleeps
per request, while a 429 must slow the whole worker (:mod:`bridge.hydrate.pace`).

Needs the ``hydrate`` extra; without it, importing this module raises
:class:`~bridge.extras.MissingExtraError`.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

from bridge.extras import MissingExtraError, installed
from bridge.hydrate.fetching import (
    ApiAnswer,
    ApiFailure,
    FailureKind,
    KeyLookup,
    UnknownSource,
    retry_after_seconds,
)
from bridge.hydrate.mapping import Hydration

if not installed("openai"):
    raise MissingExtraError("webhook-bridge hydrate", "hydrate")

import openai  # only once the extra is known to be there

__all__ = ["OpenAIFetcher"]


class OpenAIFetcher:
    """One ``AsyncOpenAI`` client per API key, created when first needed."""

    def __init__(
        self,
        api_key_for: KeyLookup,
        *,
        base_url: str | None,
        organization: str | None,
        project: str | None,
        timeout: float,
    ) -> None:
        self._api_key_for = api_key_for
        self._options: dict[str, Any] = {
            "base_url": base_url,
            "organization": organization,
            "project": project,
            "timeout": timeout,
            "max_retries": 0,
        }
        self._clients: dict[str, openai.AsyncOpenAI] = {}

    def _client(self, source: str | None) -> openai.AsyncOpenAI:
        key = self._api_key_for(source)
        client = self._clients.get(key)
        if client is None:
            client = self._clients[key] = openai.AsyncOpenAI(api_key=key, **self._options)
        return client

    async def fetch(self, hydration: Hydration, object_id: str, source: str | None) -> ApiAnswer:
        try:
            client = self._client(source)
        except UnknownSource as error:
            raise ApiFailure(FailureKind.UNKNOWN_SOURCE, 0, str(error)) from None
        retrieve = _raw_retrieve(client, hydration.sdk_method)
        try:
            response = await retrieve(object_id)
        except openai.APITimeoutError:
            raise ApiFailure(FailureKind.TIMEOUT, 0, "the API did not answer in time") from None
        except openai.APIConnectionError as error:
            raise ApiFailure(FailureKind.SERVER_ERROR, 0, str(error)) from None
        except openai.APIStatusError as error:
            raise _failure(error) from None
        return ApiAnswer(response.content, response.status_code)

    async def close(self) -> None:
        for client in self._clients.values():
            await client.close()
        self._clients.clear()


def _raw_retrieve(client: openai.AsyncOpenAI, sdk_method: str) -> Callable[[str], Awaitable[Any]]:
    """``client.<resource>.with_raw_response.retrieve`` for ``sdk_method``."""
    *resource_path, method = sdk_method.split(".")
    resource: Any = client
    for name in resource_path:
        resource = getattr(resource, name)
    retrieve: Callable[[str], Awaitable[Any]] = getattr(resource.with_raw_response, method)
    return retrieve


def _failure(error: openai.APIStatusError) -> ApiFailure:
    status = error.status_code
    message = f"{status} {error.message}"
    if status == 429:
        retry_after = retry_after_seconds(error.response.headers)
        return ApiFailure(FailureKind.RATE_LIMITED, status, message, retry_after)
    if status >= 500:
        return ApiFailure(FailureKind.SERVER_ERROR, status, message)
    kind = {
        401: FailureKind.UNAUTHORIZED,
        403: FailureKind.FORBIDDEN,
        404: FailureKind.NOT_FOUND,
    }.get(status, FailureKind.REFUSED)
    return ApiFailure(kind, status, message)
