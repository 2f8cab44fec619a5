"""Configuration: YAML + environment, interpolation, precise errors, `gateway check`."""

from __future__ import annotations

from pathlib import Path

import pytest
from typer.testing import CliRunner

from gateway.cli import app
from gateway.config import interpolate, load_settings
from gateway.errors import ConfigurationError

VALID = """
store:
  url: sqlite:///{db}
bus:
  url: amqp://gw:${{AMQP_PASSWORD}}@127.0.0.1:5672/%2F
sources:
  - name: orders
    adapter: sql
    config:
      url: sqlite:///{legacy}
      table: orders
      key_column: id
      timestamp_column: updated_at
    mapping:
      type: com.acme.order.changed
      entity: order
      key: [id]
      version: updated_at
"""


def _write(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "gateway.yaml"
    p.write_text(text)
    return p


def test_valid_file_and_secret_interpolation(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("AMQP_PASSWORD", "s3cret-sentinel")
    p = _write(tmp_path, VALID.format(db=tmp_path / "g.db", legacy=tmp_path / "l.db"))
    s = load_settings(p)
    assert s.bus.url is not None and "s3cret-sentinel" in s.bus.url.get_secret_value()
    assert "s3cret-sentinel" not in repr(s)
    assert s.sources[0].mapping.key == ["id"]


def test_environment_overrides_yaml(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("AMQP_PASSWORD", "x")
    monkeypatch.setenv("GATEWAY_BUS__PREFIX", "fromenv")
    monkeypatch.setenv("GATEWAY_API__PORT", "9999")
    s = load_settings(_write(tmp_path, VALID.format(db="a.db", legacy="l.db")))
    assert s.bus.prefix == "fromenv" and s.api.port == 9999
    assert s.bus.url is not None  # YAML values not overridden survive


def test_missing_variable_names_file_and_line(tmp_path, monkeypatch) -> None:
    monkeypatch.delenv("AMQP_PASSWORD", raising=False)
    p = _write(tmp_path, VALID.format(db="a.db", legacy="l.db"))
    with pytest.raises(ConfigurationError, match=r"gateway\.yaml:5: environment variable AMQP_PASSWORD is not set"):
        load_settings(p)


def test_interpolation_default_and_file(tmp_path) -> None:
    secret = tmp_path / "pw"
    secret.write_text("from-file\n")
    assert interpolate("a=${X:-dflt}", {}) == "a=dflt"
    assert interpolate("a=${X}", {"X_FILE": str(secret)}) == "a=from-file"


def test_errors_name_file_path_and_expectation(tmp_path) -> None:
    p = _write(tmp_path, "bus:\n  prefetch: -1\nsources:\n  - name: Bad Name\n    adapter: sql\n")
    with pytest.raises(ConfigurationError) as err:
        load_settings(p)
    text = str(err.value)
    assert f"{p}: bus.prefetch: Input should be greater than or equal to 1 (got -1)" in text
    assert f"{p}: sources[0].name: String should match pattern" in text
    assert f"{p}: sources[0].mapping: Field required" in text


def test_unknown_keys_are_errors(tmp_path) -> None:
    with pytest.raises(ConfigurationError, match=r"bus\.prefecth: Extra inputs are not permitted"):
        load_settings(_write(tmp_path, "bus:\n  prefecth: 5\n"))


def test_bad_yaml_has_line_and_column(tmp_path) -> None:
    with pytest.raises(ConfigurationError, match=r"gateway\.yaml:2:\d+: not valid YAML"):
        load_settings(_write(tmp_path, "a: [\nb: :\n"))


runner = CliRunner()


def test_check_valid_exits_0(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("AMQP_PASSWORD", "x")
    p = _write(tmp_path, VALID.format(db="a.db", legacy="l.db"))
    result = runner.invoke(app, ["check", "-c", str(p)])
    assert result.exit_code == 0, result.output
    assert "OK (1 source(s), bus: rabbitmq)" in result.output


def test_check_invalid_exits_2_with_adapter_config_path(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("AMQP_PASSWORD", "x")
    bad = VALID.format(db="a.db", legacy="l.db").replace("table: orders", "table: 'orders; DROP TABLE x'")
    bad = bad.replace("key_column: id", 'key_column: id"--')
    result = runner.invoke(app, ["check", "-c", str(_write(tmp_path, bad))])
    assert result.exit_code == 2
    assert "sources[0].config.table: Value error, table 'orders; DROP TABLE x' is not a plain SQL identifier" in result.output
    assert "sources[0].config.key_column" in result.output


def test_check_unknown_adapter_lists_available(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("AMQP_PASSWORD", "x")
    bad = VALID.format(db="a.db", legacy="l.db").replace("adapter: sql", "adapter: sqll")
    result = runner.invoke(app, ["check", "-c", str(_write(tmp_path, bad))])
    assert result.exit_code == 2
    assert "unknown adapter 'sqll'; available: " in result.output and "sql" in result.output


def test_check_connect_finds_missing_columns(tmp_path, monkeypatch) -> None:
    from sqlalchemy import create_engine, text

    legacy = tmp_path / "l.db"
    eng = create_engine(f"sqlite:///{legacy}")
    with eng.begin() as c:
        c.execute(text("CREATE TABLE orders (id INTEGER PRIMARY KEY, amount NUMERIC)"))
    eng.dispose()
    monkeypatch.setenv("AMQP_PASSWORD", "x")
    p = _write(tmp_path, VALID.format(db="a.db", legacy=legacy))
    result = runner.invoke(app, ["check", "--connect", "-c", str(p)])
    assert result.exit_code == 2
    assert "column(s) 'updated_at' not in table 'orders'" in result.output


def test_check_missing_file(tmp_path) -> None:
    result = runner.invoke(app, ["check", "-c", str(tmp_path / "nope.yaml")])
    assert result.exit_code == 2 and "configuration file not found" in result.output


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("amqp://guest:pw@127.0.0.1:5672/%2F", "refuses the 'guest' broker user"),
        ("amqp://rabbit.example.internal/%2F", "refuses the 'guest' broker user"),
        ("amqp://gw:pw@rabbit.example.internal:5672/%2F", "refuses plaintext amqp:// to rabbit.example.internal"),
    ],
)
def test_prod_profile_transport_rules(tmp_path, url, message) -> None:
    p = _write(tmp_path, f"profile: prod\nbus:\n  url: {url}\n")
    with pytest.raises(ConfigurationError, match=message) as err:
        load_settings(p)
    assert "pw" not in str(err.value)


@pytest.mark.parametrize("url", ["amqps://gw:pw@rabbit.example.internal:5671/%2F", "amqp://gw:pw@127.0.0.1:5672/%2F"])
def test_prod_profile_accepts_tls_or_loopback(tmp_path, url) -> None:
    assert load_settings(_write(tmp_path, f"profile: prod\nbus:\n  url: {url}\n")).profile == "prod"
    assert load_settings(_write(tmp_path, "profile: dev\nbus:\n  url: amqp://guest:guest@far.example/%2F\n")).profile == "dev"


SOAP_WITH_AUTH = """
profile: {profile}
sources:
  - name: erp
    adapter: soap
    config:
      wsdl: /srv/erp.wsdl
      operation: GetOrders
      records_path: orders
      key_field: id
      time_field: updatedAt
      auth: {{type: wsse, username: gw, password: {password}}}
    mapping: {{type: com.acme.order.changed, entity: order, key: [id]}}
"""


def test_prod_refuses_secrets_written_into_the_file(tmp_path, monkeypatch) -> None:
    path = tmp_path / "g.yaml"
    path.write_text(SOAP_WITH_AUTH.format(profile="prod", password="hunter2"))
    with pytest.raises(ConfigurationError) as info:
        load_settings(path)
    assert str(info.value) == (
        f"{path}: sources[0].config.auth.password: a secret must come from the environment: "
        "write ${VAR} (or set VAR_FILE to a file)"
    )
    path.write_text(SOAP_WITH_AUTH.format(profile="prod", password='"${ERP_PASSWORD}"'))
    monkeypatch.setenv("ERP_PASSWORD", "hunter2")
    settings = load_settings(path)
    assert settings.sources[0].config["auth"]["password"] == "hunter2"


def test_dev_warns_about_secrets_written_into_the_file(tmp_path, caplog) -> None:
    path = tmp_path / "g.yaml"
    path.write_text(SOAP_WITH_AUTH.format(profile="dev", password="hunter2"))
    with caplog.at_level("WARNING", logger="gateway.config"):
        load_settings(path)
    assert "sources[0].config.auth.password: a secret must come from the environment" in caplog.text
    assert "hunter2" not in caplog.text


def test_literal_secrets_finds_every_secret_key_and_accepts_references() -> None:
    from gateway.config import literal_secrets

    raw = {
        "sources": [{"config": {"auth": {"password": "x", "tls": {"cert_file": "/c.pem"}}, "token": "${T}", "api_key": 42}}],
        "other": {"secret": "${S:-fallback}", "password": None},
    }
    assert literal_secrets(raw) == ["sources[0].config.auth.password", "sources[0].config.api_key"]


def test_delivery_limit_must_exceed_max_attempts() -> None:
    from pydantic import ValidationError

    from gateway.config import BusSettings

    assert BusSettings(delivery_limit=4, max_attempts=3).delivery_limit == 4
    with pytest.raises(ValidationError, match=r"delivery_limit \(3\) must be greater than max_attempts \(3\)"):
        BusSettings(delivery_limit=3, max_attempts=3)
