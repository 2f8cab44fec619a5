"""``process`` settings: the garbage-collector tuning of long-running processes."""

from __future__ import annotations

import gc
import weakref
from collections.abc import Iterator

import pytest
from pydantic import ValidationError

from gateway.config import ProcessSettings, Settings
from gateway.runtime import tune_process


@pytest.fixture
def restore_gc() -> Iterator[None]:
    before = gc.get_threshold()
    yield
    gc.unfreeze()
    gc.set_threshold(*before)


def test_defaults_freeze_and_raise_the_young_threshold(restore_gc: None) -> None:
    gc.unfreeze()
    _, gen1, gen2 = gc.get_threshold()
    tune_process(Settings().process)
    assert gc.get_freeze_count() > 1000  # the modules, classes and functions loaded by the test run
    assert gc.get_threshold() == (10000, gen1, gen2)  # only the young generation changes


def test_settings_are_followed(restore_gc: None) -> None:
    gc.unfreeze()
    tune_process(ProcessSettings(gc_freeze=False, gc_threshold=700))
    assert gc.get_freeze_count() == 0
    assert gc.get_threshold()[0] == 700


def test_garbage_is_collected_before_the_freeze(restore_gc: None) -> None:
    gc.unfreeze()

    class Node:
        other: object

    a, b = Node(), Node()
    a.other, b.other = b, a  # a cycle only the collector can free
    gone = weakref.ref(a)
    del a, b
    tune_process(ProcessSettings())
    assert gone() is None  # collected, not frozen alive


@pytest.mark.parametrize("value", [0, 99, 1_000_001])
def test_out_of_range_threshold_is_a_config_error(value: int) -> None:
    with pytest.raises(ValidationError, match="gc_threshold"):
        Settings(process={"gc_threshold": value})


def test_long_running_commands_tune_after_start_up(monkeypatch: pytest.MonkeyPatch) -> None:
    """``gateway run`` / ``worker`` / ``api`` (``_run_roles``) tune the process once the roles started."""
    import threading

    import gateway.cli as cli
    import gateway.runtime as runtime

    calls: list[str] = []

    class FakeGateway:
        def __init__(self, settings: Settings, roles: list[str], scoring_routes: object = None) -> None:
            calls.append("init")

        def start(self) -> None:
            calls.append("start")

        def stop(self) -> None:
            calls.append("stop")

    done = threading.Event()
    done.set()  # the signal handler's event: already set, so _run_roles returns at once
    monkeypatch.setattr(runtime, "Gateway", FakeGateway)
    monkeypatch.setattr(runtime, "tune_process", lambda s: calls.append(f"tune {s.gc_threshold}"))
    monkeypatch.setattr(cli.threading, "Event", lambda: done)
    monkeypatch.setattr(cli.signal, "signal", lambda *a: None)
    cli._run_roles(Settings(process={"gc_threshold": 5000}), ["relay"])
    assert calls == ["init", "start", "tune 5000", "stop"]
