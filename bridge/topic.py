"""RabbitMQ topic-pattern matching, for filtering on the client side as a binding would.

Words are separated by dots; ``*`` matches exactly one word and ``#`` zero or more.
"""

from __future__ import annotations

from functools import lru_cache


def topic_matches(pattern: str, routing_key: str) -> bool:
    """Whether a queue bound with ``pattern`` would receive ``routing_key``."""
    return _matches(tuple(pattern.split(".")), tuple(routing_key.split(".")))


def any_topic_matches(patterns: tuple[str, ...], routing_key: str) -> bool:
    return any(topic_matches(pattern, routing_key) for pattern in patterns)


@lru_cache(maxsize=4096)
def _matches(pattern: tuple[str, ...], words: tuple[str, ...]) -> bool:
    if not pattern:
        return not words
    head, rest = pattern[0], pattern[1:]
    if head == "#":
        return any(_matches(rest, words[skip:]) for skip in range(len(words) + 1))
    if not words:
        return False
    return (head in ("*", words[0])) and _matches(rest, words[1:])
