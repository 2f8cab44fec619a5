"""Deterministic crash points for chaos tests (REL-02, REL-06, REL-07).

Production code marks the places where a crash is most dangerous -- between a commit and the
acknowledgement that depends on it -- with :func:`crash_point`. Normally the call costs one
environment lookup and does nothing. With ``GATEWAY_CRASH_POINTS`` set, the process dies there
with ``os._exit`` (no ``finally`` blocks, no flush, no clean close: like ``kill -9``)::

    GATEWAY_CRASH_POINTS="scoring.after_commit_before_ack"          # the first time it is reached
    GATEWAY_CRASH_POINTS="scoring.after_commit_before_ack=ev-42"    # when event ev-42 passes it
    GATEWAY_CRASH_POINTS="relay.after_publish_before_mark,amqp.after_commit_before_ack=a|b"

Keys (after ``=``) are ``|``-separated; a point with keys fires only when one of the keys passes.
Only tests set the variable; it is never read from the config file.
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Iterable

__all__ = ["ENV", "EXIT_CODE", "armed", "crash_point"]

log = logging.getLogger("gateway.crash")

#: Environment variable naming the armed crash points.
ENV = "GATEWAY_CRASH_POINTS"
#: Exit status of a process killed by a crash point (tests tell it from other failures).
EXIT_CODE = 86

_cache: tuple[str, dict[str, frozenset[str]]] = ("", {})


def _points() -> dict[str, frozenset[str]]:
    global _cache
    raw = os.environ.get(ENV, "")
    if raw != _cache[0]:
        points: dict[str, frozenset[str]] = {}
        for item in filter(None, (part.strip() for part in raw.split(","))):
            name, _, keys = item.partition("=")
            points[name.strip()] = frozenset(k for k in keys.split("|") if k)
        _cache = (raw, points)
    return _cache[1]


def armed(name: str) -> bool:
    """Whether crash point ``name`` is armed (lets callers skip building keys)."""
    return name in _points() if os.environ.get(ENV) else False


def crash_point(name: str, keys: str | Iterable[str] | None = None) -> None:
    """Die at once if crash point ``name`` is armed (for one of ``keys``, when it has keys).

    Args:
        name: the point, e.g. ``"scoring.after_commit_before_ack"``.
        keys: what passes the point now (an event id, or several); matched against the keys the
            point was armed with.
    """
    if not os.environ.get(ENV):
        return
    wanted = _points().get(name)
    if wanted is None:
        return
    if wanted:
        passing = {keys} if isinstance(keys, str) else set(keys or ())
        hit = wanted & passing
        if not hit:
            return
        what = f"{name} ({min(hit)})"
    else:
        what = name
    log.critical("crash point %s reached: exiting with status %d", what, EXIT_CODE)
    sys.stderr.write(f"gateway: crash point {what} reached\n")
    sys.stderr.flush()
    os._exit(EXIT_CODE)
