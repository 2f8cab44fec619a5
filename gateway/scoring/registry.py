"""Scorer discovery through entry points (group ``gateway.scorers``) and named model instances.

Every scorer kind, built-in or third-party, is an entry point whose object is a *factory*::

    def create(name: str, options: dict[str, Any], settings: ScoringSettings) -> Scorer: ...

``name`` is the model's configured name (``scoring.models.<name>``, or the kind itself when
``scoring.model`` names a kind directly), ``options`` its ``options`` mapping, and ``settings`` the
whole ``scoring`` section. The factory validates its own options -- :func:`parse_options` turns a
pydantic model into error messages that name ``scoring.models.<name>.options.<field>`` -- and
raises :class:`~gateway.errors.ConfigurationError` for anything it refuses.

Entry points load lazily, when a model of their kind is built. Unlike adapters, a scorer plugin
that fails to import is not skipped silently: the model was asked for by name, so building it is a
ConfigurationError naming the plugin and the import error.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from functools import lru_cache
from importlib.metadata import EntryPoint
from typing import Any, Protocol, TypeVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from gateway.config import ScoringSettings
from gateway.errors import ConfigurationError
from gateway.plugins import discover
from gateway.scoring.online import OnlineAnomalyScorer
from gateway.scoring.protocols import Scorer

__all__ = [
    "SCORER_GROUP",
    "ScorerFactory",
    "build_scorer",
    "create_online",
    "known_scorers",
    "load_factory",
    "parse_options",
]

SCORER_GROUP = "gateway.scorers"
_BUILTIN_PREFIX = "gateway.scoring."
log = logging.getLogger(__name__)
_M = TypeVar("_M", bound=BaseModel)


class ScorerFactory(Protocol):
    """What a ``gateway.scorers`` entry point loads."""

    def __call__(self, name: str, options: dict[str, Any], settings: ScoringSettings) -> Scorer:
        """Build the scorer ``name`` of this kind.

        Args:
            name: the model's configured name; use it as the scorer's ``name``.
            options: ``scoring.models.<name>.options`` (empty when the kind is used by name).
            settings: the whole ``scoring`` section, for shared defaults.

        Returns:
            A ready :class:`~gateway.scoring.protocols.Scorer`.

        Raises:
            ConfigurationError: invalid options; the message names
                ``scoring.models.<name>.options.<field>``, what was wrong and what was expected.
        """
        ...


@lru_cache(maxsize=1)
def _entry_points() -> dict[str, EntryPoint]:
    return discover(SCORER_GROUP, _BUILTIN_PREFIX, "scorer")


def _clear_cache() -> None:
    """Forget discovered entry points (for tests that install fake plugins)."""
    _entry_points.cache_clear()


def known_scorers() -> list[str]:
    """Installed scorer kinds (entry point names of ``gateway.scorers``), sorted."""
    return sorted(_entry_points())


def load_factory(kind: str, *, where: str = "scoring.model") -> ScorerFactory:
    """The factory registered as scorer kind ``kind``.

    Args:
        kind: an entry point name of ``gateway.scorers``.
        where: the configuration path that named ``kind``, for the error message.

    Returns:
        The factory (a callable, see :class:`ScorerFactory`).

    Raises:
        ConfigurationError: unknown kind (the message lists the installed ones), the plugin failed
            to import (the message names the plugin and the error), or it is not callable.
    """
    ep = _entry_points().get(kind)
    if ep is None:
        raise ConfigurationError(
            f"{where}: unknown scorer kind {kind!r}; installed: {', '.join(known_scorers()) or 'none'}"
        )
    try:
        factory = ep.load()
    except Exception as exc:  # any import failure of a plugin is a configuration problem
        log.warning("scorer plugin %r (%s) failed to load: %s: %s", kind, ep.value, type(exc).__name__, exc)
        raise ConfigurationError(
            f"{where}: scorer plugin {kind!r} ({ep.value}) failed to load: {type(exc).__name__}: {exc}"
        ) from exc
    if not callable(factory):
        raise ConfigurationError(f"{where}: scorer plugin {kind!r} ({ep.value}) is not a callable factory")
    return factory  # type: ignore[no-any-return]


def build_scorer(name: str, settings: ScoringSettings, *, where: str = "scoring.model") -> Scorer:
    """Build the model ``name``: an entry of ``settings.models``, or else a kind with empty options.

    Args:
        name: a key of ``scoring.models``, or a scorer kind.
        settings: the ``scoring`` section.
        where: the configuration path that named the model (``scoring.model``, a fallback...),
            used in error messages when ``name`` is neither a configured model nor a kind.

    Returns:
        The scorer; its ``name`` is the configured name.

    Raises:
        ConfigurationError: unknown name or kind (lists the configured models and installed
            kinds), a plugin that fails to import, or options its factory refuses.
    """
    spec = settings.models.get(name)
    if spec is not None:
        kind, options, origin = spec.kind, dict(spec.options), f"scoring.models.{name}.kind"
    else:
        kind, options, origin = name, {}, where
        if name not in _entry_points():
            configured = ", ".join(sorted(settings.models)) or "none"
            raise ConfigurationError(
                f"{where}: {name!r} is neither a configured model (scoring.models: {configured}) nor an "
                f"installed scorer kind (installed: {', '.join(known_scorers()) or 'none'})"
            )
    scorer = load_factory(kind, where=origin)(name, options, settings)
    if not isinstance(scorer, Scorer):
        raise ConfigurationError(
            f"{origin}: scorer plugin {kind!r} returned {type(scorer).__name__}, which is not a Scorer "
            "(needs name, version and score_batch)"
        )
    return scorer


def parse_options(model: type[_M], name: str, options: Mapping[str, Any]) -> _M:
    """Validate a factory's ``options`` with a pydantic model (use ``extra="forbid"``).

    Args:
        model: the options model.
        name: the model's configured name (for the paths in messages).
        options: the raw options.

    Returns:
        The validated options.

    Raises:
        ConfigurationError: one line per problem, ``scoring.models.<name>.options.<field>: <what>
            (got <value>)``.
    """
    try:
        return model.model_validate(dict(options))
    except ValidationError as exc:
        lines = []
        for err in exc.errors():
            path = ".".join(["options", *(str(p) for p in err["loc"])])
            msg = err["msg"].removeprefix("Value error, ")
            shown = _short(err.get("input"))
            secret = any(word in path.lower() for word in _SECRET_WORDS)  # never echo a credential
            got = "" if err["type"] == "missing" or secret or shown in msg else f" (got {shown})"
            lines.append(f"scoring.models.{name}.{path}: {msg}{got}")
        raise ConfigurationError("; ".join(lines)) from None


_SECRET_WORDS = ("password", "secret", "token", "key", "auth", "header", "url", "credential")


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


class OnlineOptions(BaseModel):
    """Options of the built-in ``online-anomaly`` kind; unset ones come from ``scoring.*``."""

    model_config = ConfigDict(extra="forbid")

    warmup: int | None = Field(None, ge=1, description="Default scoring.warmup.")
    exclude_fields: list[str] | None = Field(None, description="Default scoring.exclude_fields.")
    horizon: int = Field(10_000, ge=1, description="Effective memory in events (drift).")
    max_categories: int = Field(50, ge=1, description="Distinct values above which a categorical field is dropped.")
    max_features: int = Field(100, ge=1, description="Features tracked per event type.")
    top_k: int = Field(3, ge=1, description="Features listed in each explanation.")
    clip_z: float = Field(4.0, gt=0, allow_inf_nan=False, description="Winsorisation bound in standard deviations.")


def create_online(name: str, options: dict[str, Any], settings: ScoringSettings) -> Scorer:
    """Factory of the built-in ``online-anomaly`` kind (see :class:`OnlineOptions`).

    Args:
        name: the model's configured name; becomes the scorer's name (and its checkpoint key).
        options: see :class:`OnlineOptions`.
        settings: ``scoring.warmup`` and ``scoring.exclude_fields`` are the defaults.

    Returns:
        A fresh :class:`~gateway.scoring.online.OnlineAnomalyScorer`.

    Raises:
        ConfigurationError: invalid options.
    """
    opts = parse_options(OnlineOptions, name, options)
    scorer = OnlineAnomalyScorer(
        warmup=opts.warmup if opts.warmup is not None else settings.warmup,
        exclude_fields=opts.exclude_fields if opts.exclude_fields is not None else settings.exclude_fields,
        horizon=opts.horizon,
        max_categories=opts.max_categories,
        max_features=opts.max_features,
        top_k=opts.top_k,
        clip_z=opts.clip_z,
    )
    scorer.name = name
    return scorer
