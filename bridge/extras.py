"""Optional features, the extras that install them, and what happens without them.

``pip install openai-webhook-bridge`` alone runs every command. The ``otel`` extra adds
span export (``OTEL_*``); the ``redis`` extra adds deduplication across pods
(``BRIDGE_DEDUP_URL``) and the consumers' ``RedisIdempotencyStore``. A feature that has
a fallback looks its package up with :func:`installed` and falls back quietly (consumer
spans: without OpenTelemetry's API, none); one that has none stops at start-up naming
its extra, and a module that cannot work without its extra raises
:class:`MissingExtraError` when it is imported.
"""

from __future__ import annotations

import importlib.util

__all__ = ["DISTRIBUTION", "MissingExtraError", "installed"]

DISTRIBUTION = "openai-webhook-bridge"


class MissingExtraError(ImportError):
    """``feature`` needs packages that only the extra ``extra`` installs."""

    def __init__(self, feature: str, extra: str) -> None:
        super().__init__(
            f"{feature} needs the {extra!r} extra: pip install '{DISTRIBUTION}[{extra}]'"
        )
        self.feature = feature
        self.extra = extra


def installed(module: str) -> bool:
    """Whether ``module`` can be imported, found without importing more than its parents.

    ``importlib.util.find_spec("a.b")`` imports ``a`` first, and raises rather than
    answers when ``a`` is missing.
    """
    try:
        return importlib.util.find_spec(module) is not None
    except ModuleNotFoundError:
        return False
