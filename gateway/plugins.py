"""Plugin discovery through entry points (group ``gateway.adapters``).

Built-in adapters are registered by the same entry points as third-party ones. Plugins load
lazily by name; a plugin that fails to import warns and is skipped; an unknown name raises a
ConfigurationError listing the available ones.
"""

from __future__ import annotations

import logging
from functools import lru_cache
from importlib.metadata import EntryPoint, entry_points

from adapters.base import PollingSource
from gateway.errors import ConfigurationError

__all__ = ["ADAPTER_GROUP", "adapter_names", "discover", "load_adapter"]

ADAPTER_GROUP = "gateway.adapters"
log = logging.getLogger(__name__)


def discover(group: str, builtin_prefix: str, what: str) -> dict[str, EntryPoint]:
    """The entry points of ``group`` by name (adapters, codecs, scorers share this rule).

    A plugin may not take over a built-in's name (a built-in's entry point value starts with
    ``builtin_prefix``); between two plugins of one name the first one found wins. Either way a
    WARNING names both.
    """
    found: dict[str, EntryPoint] = {}
    for ep in entry_points(group=group):
        prev = found.get(ep.name)
        if prev is not None and prev.value != ep.value:
            keep = ep if ep.value.startswith(builtin_prefix) else prev
            log.warning("%s %r is registered twice (%s, %s); using %s", what, ep.name, prev.value, ep.value, keep.value)
            ep = keep
        found[ep.name] = ep
    return found


@lru_cache(maxsize=1)
def _entry_points() -> dict[str, EntryPoint]:
    return discover(ADAPTER_GROUP, "adapters.", "adapter")


def adapter_names() -> list[str]:
    """Names of every installed adapter plugin."""
    return sorted(_entry_points())


def load_adapter(name: str) -> type[PollingSource]:  # type: ignore[type-arg]
    """The adapter class registered as ``name``.

    Raises:
        ConfigurationError: unknown name (the message lists the available ones), or the plugin
            failed to load.
    """
    ep = _entry_points().get(name)
    if ep is None:
        raise ConfigurationError(
            f"unknown adapter {name!r}; available: {', '.join(adapter_names()) or 'none installed'}"
        )
    try:
        cls = ep.load()
    except Exception as exc:  # a broken plugin must not take the gateway down
        log.warning("adapter plugin %r failed to load: %s: %s", name, type(exc).__name__, exc)
        raise ConfigurationError(f"adapter {name!r} failed to load: {type(exc).__name__}: {exc}") from exc
    if not (isinstance(cls, type) and issubclass(cls, PollingSource)):
        raise ConfigurationError(f"adapter {name!r} ({ep.value}) is not a PollingSource subclass")
    return cls
