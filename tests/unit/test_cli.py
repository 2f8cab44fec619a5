"""The `gateway` command: demo (embedded default), db upgrade, sources list."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from gateway.cli import app
from tests.legacy import make_orders, source_settings

runner = CliRunner()


def _demo(tmp_path: Path, *extra: str, env: dict[str, str] | None = None) -> str:
    cmd = [sys.executable, "-m", "gateway.cli", "demo", "--seconds", "6", "--rows", "600", "--port", "0",
           "--workdir", str(tmp_path), *extra]
    clean = {k: v for k, v in os.environ.items() if not k.startswith("GATEWAY_")}
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=120, env={**clean, **(env or {})})
    assert out.returncode == 0, out.stderr[-3000:]
    return out.stdout


def _check_demo_output(text: str) -> None:
    assert "Top-scored events" in text
    progress = re.findall(r"events\s+(\d+) \| published\s+(\d+) \| scored\s+(\d+)", text)
    assert progress, text
    events, published, scored = map(int, progress[-1])
    # Not published >= scored: the scorer can store a score before the relay has recorded the
    # broker's confirm of that event (both follow the same publish), so it is racy by design.
    assert events >= 600 and scored >= 600 and events >= published and events >= scored
    per_source = dict(re.findall(r"(card-transactions|legacy-orders) (\d+)", text.split("Events per source:")[1]))
    assert int(per_source["card-transactions"]) >= 600 and int(per_source["legacy-orders"]) >= 120  # the SOAP source
    if "legacy queue: skipped" not in text:  # a RabbitMQ answered: the mainframe queue source ran
        assert int(re.search(r"mainframe-bookings (\d+)", text).group(1)) > 0  # type: ignore[union-attr]
    top = re.findall(r"^\s+(\d\.\d{3})\s+(?:transaction|order|booking)/(\d+)", text, re.M)
    assert len(top) == 10
    assert all(0.0 <= float(s) <= 1.0 for s, _ in top)
    assert float(top[0][0]) > 0.9  # the anomalies stand out


def test_demo_runs_on_the_embedded_default(tmp_path: Path) -> None:
    text = _demo(tmp_path)
    assert "store: SQLite; bus: in-process" in text
    assert "legacy queue: " in text  # included when a RabbitMQ answers on localhost, else says it skips
    _check_demo_output(text)


@pytest.mark.integration
def test_demo_runs_on_rabbitmq_and_postgres(tmp_path: Path, amqp_url: str, pg_db_url: str) -> None:
    text = _demo(tmp_path, env={"GATEWAY_BUS__URL": amqp_url, "GATEWAY_STORE__URL": pg_db_url})
    assert "store: external; bus: RabbitMQ" in text
    _check_demo_output(text)


def test_db_upgrade_and_sources_list(tmp_path: Path, monkeypatch) -> None:
    import json

    legacy = f"sqlite:///{tmp_path / 'legacy.db'}"
    make_orders(legacy, 5).dispose()
    import yaml

    cfg = tmp_path / "g.yaml"
    cfg.write_text(yaml.safe_dump({"store": {"url": f"sqlite:///{tmp_path / 'g.db'}"}, "sources": [source_settings(legacy)]}))
    result = runner.invoke(app, ["db", "upgrade", "-c", str(cfg)])
    from alembic.script import ScriptDirectory

    from gateway.store.migrate import alembic_config

    head = ScriptDirectory.from_config(alembic_config()).get_current_head()
    assert result.exit_code == 0 and f"store at revision {head}" in result.output
    from gateway.config import load_settings
    from gateway.sources.runner import SourceRunner
    from gateway.store import EventStore, make_engine

    settings = load_settings(cfg)
    store = EventStore(make_engine(f"sqlite:///{tmp_path / 'g.db'}"))
    SourceRunner(settings.sources[0], store).run_once()
    result = runner.invoke(app, ["sources", "list", "-c", str(cfg)])
    assert result.exit_code == 0, result.output
    line = next(ln for ln in result.output.splitlines() if ln.startswith("orders"))
    assert " sql " in line and " 5 " in line and " idle " in line
    listed = runner.invoke(app, ["sources", "list", "-c", str(cfg), "--json"])
    assert json.loads(listed.output)[0]["cursor"]["key"] == 5


def test_worker_role_needs_rabbitmq(tmp_path: Path) -> None:
    result = runner.invoke(app, ["worker", "--role", "relay"])
    assert result.exit_code == 2 and "need RabbitMQ" in result.output
    result = runner.invoke(app, ["worker", "--role", "nope"])
    assert result.exit_code == 2 and "expected one of sources, relay, scorer" in result.output


def test_sources_test_is_a_dry_run(tmp_path: Path) -> None:
    import json

    import yaml

    legacy = f"sqlite:///{tmp_path / 'legacy.db'}"
    make_orders(legacy, 8).dispose()
    cfg = tmp_path / "g.yaml"
    cfg.write_text(yaml.safe_dump({"store": {"url": f"sqlite:///{tmp_path / 'g.db'}"}, "sources": [source_settings(legacy)]}))
    result = runner.invoke(app, ["sources", "test", "orders", "-c", str(cfg), "--limit", "3"])
    assert result.exit_code == 0, result.output
    events = [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]
    assert [e["subject"] for e in events] == ["order/1", "order/2", "order/3"]
    assert "Dry run: nothing was committed" in result.output and "(more waiting)" in result.output
    from gateway.store import EventStore, make_engine
    from gateway.store.migrate import upgrade

    engine = make_engine(f"sqlite:///{tmp_path / 'g.db'}")
    upgrade(engine)
    store = EventStore(engine)
    assert store.stats()["events"] == 0 and store.get_cursor("orders") is None
    bad = runner.invoke(app, ["sources", "test", "nope", "-c", str(cfg)])
    assert bad.exit_code == 2 and "unknown source 'nope' (known: orders)" in bad.output


def test_demo_says_it_skips_the_queue_source_without_a_rabbitmq(tmp_path: Path) -> None:
    text = _demo(tmp_path, "--legacy-amqp-url", "amqp://guest:guest@127.0.0.1:1/%2F")
    assert "legacy queue: skipped, the legacy RabbitMQ at 127.0.0.1:1 is not usable" in text
    assert "mainframe-bookings" not in text.split("Events per source:")[1].splitlines()[0]
    _check_demo_output(text)


def test_demo_host_formatting_survives_an_invalid_port() -> None:
    from gateway.cli import _host_of

    assert _host_of("amqp://guest:secret@mq.example:5673/%2F") == "mq.example:5673"
    assert _host_of("amqp://guest:secret@mq.example/%2F") == "mq.example:5672"
    assert _host_of("amqp://guest:secret@mq.example:notaport/") == "mq.example (invalid port)"


def test_plugins_list_shows_every_kind_and_a_broken_plugin(monkeypatch: pytest.MonkeyPatch) -> None:
    import json as _json
    from importlib.metadata import EntryPoint

    from gateway import plugins
    from gateway.cli import app
    from tests.plugins import install_fake_plugins

    from gateway.codecs import registry as codecs
    from gateway.scoring import registry as scorers

    codecs._entry_points(), scorers._entry_points()  # cached before the fake (it patches only the adapters' group)
    broken = EntryPoint("broken-src", "no_such_module_xyz:Source", "gateway.adapters")
    gen = install_fake_plugins(monkeypatch, "gateway.adapters", [broken], [], plugins._entry_points.cache_clear)
    next(gen)
    try:
        result = runner.invoke(app, ["plugins", "list", "--json"])
    finally:
        next(gen, None)
    assert result.exit_code == 0, result.output
    rows = {(r["kind"], r["name"]): r for r in _json.loads(result.stdout)}
    assert {("adapter", "sql"), ("codec", "fixed"), ("scorer", "online-anomaly")} <= set(rows)
    assert rows[("adapter", "sql")]["status"] == "ok"
    assert rows[("adapter", "broken-src")]["status"] == "broken"
    assert "ModuleNotFoundError" in rows[("adapter", "broken-src")]["error"]
