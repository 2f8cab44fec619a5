"""Codec discovery through entry points (group ``gateway.codecs``).

Built-in codecs are registered by the same entry points as third-party ones, in the project's
``pyproject.toml``. Codecs load lazily by name; a plugin that fails to load logs a warning and is
skipped (left out of the available names); an unknown name is a ConfigurationError listing the
available ones.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from functools import lru_cache
from importlib.metadata import EntryPoint
from typing import Any

from pydantic import ValidationError

from gateway.codecs.base import Codec, CodecConfig
from gateway.errors import ConfigurationError
from gateway.plugins import discover

__all__ = ["CODEC_GROUP", "codec_from_config", "codec_names", "load_codec"]

CODEC_GROUP = "gateway.codecs"
_BUILTIN_PREFIX = "gateway.codecs."
log = logging.getLogger(__name__)
_broken: set[str] = set()


@lru_cache(maxsize=1)
def _entry_points() -> dict[str, EntryPoint]:
    return discover(CODEC_GROUP, _BUILTIN_PREFIX, "codec")


def _clear_cache() -> None:
    """Forget discovered entry points and broken plugins (for tests that install fakes)."""
    _entry_points.cache_clear()
    _broken.clear()


def codec_names() -> list[str]:
    """Names of the installed codecs, leaving out plugins already known to be broken."""
    return sorted(set(_entry_points()) - _broken)


def load_codec(name: str) -> type[Codec]:
    """The codec class registered as ``name``.

    Args:
        name: the format name (``"json"``, ``"fixed"``, a plugin's name).

    Returns:
        The :class:`~gateway.codecs.base.Codec` subclass.

    Raises:
        ConfigurationError: unknown name, or its plugin failed to load or is not a Codec
            subclass (logged as a warning); the message lists the available names.
    """
    ep = _entry_points().get(name)
    problem = "unknown codec format"
    if ep is not None and name not in _broken:
        try:
            cls = ep.load()
        except Exception as exc:  # noqa: BLE001 -- a broken plugin must not take the gateway down
            log.warning("codec plugin %r (%s) failed to load and is skipped: %s: %s", name, ep.value, type(exc).__name__, exc)
            _broken.add(name)
            problem = f"codec format whose plugin failed to load ({type(exc).__name__})"
        else:
            if isinstance(cls, type) and issubclass(cls, Codec):
                return cls
            log.warning("codec plugin %r (%s) is not a Codec subclass and is skipped", name, ep.value)
            _broken.add(name)
            problem = "codec format whose plugin is not a Codec subclass"
    elif name in _broken:
        problem = "codec format whose plugin failed to load"
    raise ConfigurationError(f"{problem} {name!r}; available: {', '.join(codec_names()) or 'none installed'}")


def codec_from_config(raw: Mapping[str, Any] | CodecConfig) -> Codec:
    """Build a codec from its settings, e.g. ``{"format": "csv", "delimiter": ";"}``.

    Args:
        raw: a mapping with a ``format`` key and that codec's settings, or an already
            validated config model instance.

    Returns:
        A ready codec.

    Raises:
        ConfigurationError: no or unknown ``format`` (lists the available ones), or settings the
            codec's config model refuses (names each path and what is expected).
    """
    if isinstance(raw, CodecConfig):
        return load_codec(raw.format)(raw)
    fmt = raw.get("format") if isinstance(raw, Mapping) else None
    if not isinstance(fmt, str) or not fmt:
        raise ConfigurationError(f"codec settings need a 'format'; available: {', '.join(codec_names())}")
    cls = load_codec(fmt)
    try:
        config = cls.config_model.model_validate(dict(raw))
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in err['loc']) or '(top)'}: {err['msg']}" for err in exc.errors()
        )
        raise ConfigurationError(f"codec {fmt!r} settings are invalid: {problems}") from None
    return cls(config)
