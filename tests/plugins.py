"""Fake entry-point plugins for the registry tests (adapters, codecs, scorers share one discovery)."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from importlib.metadata import EntryPoint

import pytest

import gateway.plugins as discovery


def install_fake_plugins(
    monkeypatch: pytest.MonkeyPatch,
    group: str,
    fakes: Sequence[EntryPoint],
    hijackers: Sequence[EntryPoint],
    clear_cache: Callable[[], None],
) -> Iterator[None]:
    """Make ``group`` list ``hijackers`` (found *before* the built-ins, trying to take their names),
    the real entry points, then ``fakes``; the registry's cache is cleared before and after."""
    real = list(discovery.entry_points(group=group))
    monkeypatch.setattr(discovery, "entry_points", lambda group: [*hijackers, *real, *fakes])
    clear_cache()
    yield
    monkeypatch.undo()
    clear_cache()
