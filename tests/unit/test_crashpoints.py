"""Crash points: inert unless armed; armed, they kill the process like ``kill -9`` (no cleanup)."""

from __future__ import annotations

import subprocess
import sys

import pytest

from gateway.resilience import crashpoints
from gateway.resilience.crashpoints import ENV, EXIT_CODE, armed, crash_point

SCRIPT = """
import atexit, sys
from gateway.resilience.crashpoints import crash_point
atexit.register(lambda: print("cleanup ran", flush=True))
crash_point("p.one", ["a", "b"])
print("passed a,b", flush=True)
crash_point("p.one", "k2")
print("passed k2", flush=True)
"""


def run(env_value: str | None) -> subprocess.CompletedProcess[str]:
    import os

    env = {k: v for k, v in os.environ.items() if k != ENV}
    if env_value is not None:
        env[ENV] = env_value
    return subprocess.run([sys.executable, "-c", SCRIPT], check=False, env=env, capture_output=True, text=True, timeout=60)


def test_unarmed_points_do_nothing() -> None:
    done = run(None)
    assert done.returncode == 0 and "passed k2" in done.stdout and "cleanup ran" in done.stdout


def test_a_point_with_keys_fires_only_for_its_key_and_skips_cleanup() -> None:
    done = run("other, p.one=k1|k2")
    assert done.returncode == EXIT_CODE
    assert "passed a,b" in done.stdout and "passed k2" not in done.stdout
    assert "cleanup ran" not in done.stdout  # os._exit: like kill -9, no atexit, no finally
    assert "crash point p.one (k2) reached" in done.stderr


def test_a_point_without_keys_fires_the_first_time() -> None:
    done = run("p.one")
    assert done.returncode == EXIT_CODE and "passed" not in done.stdout


def test_armed_follows_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(ENV, raising=False)
    assert not armed("x")
    crash_point("x")  # inert
    monkeypatch.setenv(ENV, "x=1")
    assert armed("x") and not armed("y")
    crash_point("x", "2")  # armed for key 1 only: still alive
    monkeypatch.setenv(ENV, "y")
    assert armed("y") and not armed("x")
    assert crashpoints._points() == {"y": frozenset()}
