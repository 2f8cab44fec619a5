"""AMQP topic patterns over event types: matching, overlap and validation.

An event type such as ``com.acme.orders.created`` is a dot-separated list of words; a pattern
matches it word by word, ``*`` standing for exactly one word and ``#`` for zero or more (the
semantics of a RabbitMQ topic exchange, which routes events by these same patterns).

No gateway imports here: the config validation uses these functions before the bus exists.
"""

from __future__ import annotations

from functools import cache

__all__ = ["check_pattern", "topic_matches", "topics_overlap"]


def topic_matches(pattern: str, key: str) -> bool:
    """AMQP topic matching: ``*`` is one word, ``#`` zero or more words."""
    p, k = pattern.split("."), key.split(".") if key else []

    def match(i: int, j: int) -> bool:
        if i == len(p):
            return j == len(k)
        if p[i] == "#":
            return any(match(i + 1, jj) for jj in range(j, len(k) + 1))
        if j == len(k):
            return False
        return (p[i] == "*" or p[i] == k[j]) and match(i + 1, j + 1)

    return match(0, 0)


def topics_overlap(a: str, b: str) -> bool:
    """True when some routing key matches both patterns ``a`` and ``b``.

    Exact, by dynamic programming over the two word lists: a ``#`` may absorb any run of the
    other pattern's words (including its own ``#``), ``*`` meets any single word.
    """
    pa, pb = tuple(a.split(".")), tuple(b.split("."))

    @cache
    def ov(i: int, j: int) -> bool:
        if i == len(pa) and j == len(pb):
            return True
        if i < len(pa) and pa[i] == "#" and (ov(i + 1, j) or (j < len(pb) and ov(i, j + 1))):
            return True
        if j < len(pb) and pb[j] == "#" and (ov(i, j + 1) or (i < len(pa) and ov(i + 1, j))):
            return True
        if i == len(pa) or j == len(pb) or pa[i] == "#" or pb[j] == "#":
            return False
        return (pa[i] == "*" or pb[j] == "*" or pa[i] == pb[j]) and ov(i + 1, j + 1)

    return ov(0, 0)


def check_pattern(pattern: str) -> str:
    """``pattern`` if it is a valid topic pattern over event types, else ValueError saying why.

    Words are separated by single dots and may not be empty; a word is ``*``, ``#`` or text
    without ``*`` and ``#``; at most 255 bytes (the AMQP routing-key limit).
    """
    if not pattern or len(pattern.encode("utf-8")) > 255:
        raise ValueError(f"type pattern {pattern!r} must be 1-255 bytes")
    for word in pattern.split("."):
        if not word:
            raise ValueError(f"type pattern {pattern!r} has an empty word (two dots, or a leading/trailing dot)")
        if word not in ("*", "#") and ("*" in word or "#" in word):
            raise ValueError(
                f"type pattern {pattern!r}: '*' and '#' must be whole words (e.g. 'orders.*', 'orders.#'), not {word!r}"
            )
        if any(c.isspace() for c in word):
            raise ValueError(f"type pattern {pattern!r} contains whitespace")
    return pattern
