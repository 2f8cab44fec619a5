"""compose.yaml and the Dockerfile, checked without a Docker engine.

* compose.yaml validates against the Compose Specification JSON schema, vendored in
  tests/data/compose-spec.json (from the ``check-jsonschema`` wheel on PyPI, which vendors the
  upstream schema; see tests/data/README.md), and a broken copy of the file does not;
* the deployment rules the schema cannot express: health checks, ``depends_on`` conditions, no
  literal secrets, pinned images, a scalable scorer;
* ``docker compose config -q`` when the docker client has the compose plugin (skipped otherwise:
  this machine has only the bare client);
* the Dockerfile: multi-stage, pinned base image, non-root user, HEALTHCHECK, no secrets.
"""

from __future__ import annotations

import copy
import hashlib
import json
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml
from jsonschema import Draft202012Validator

ROOT = Path(__file__).resolve().parents[2]
COMPOSE = ROOT / "compose.yaml"
DOCKERFILE = ROOT / "Dockerfile"
SCHEMA = ROOT / "tests" / "data" / "compose-spec.json"
#: sha256 of the vendored schema, as check-jsonschema 0.39.0 records it
#: (check_jsonschema/builtin_schemas/vendor/sha256/compose-spec.sha256).
SCHEMA_SHA256 = "d549057ebc2925f39f62799eab0db7b9e2c18b35b6c00595199116da3ed10e64"

GATEWAY_ROLES = {"api": ["api"], "sources": ["worker", "--role", "sources"],
                 "relay": ["worker", "--role", "relay"], "scorer": ["worker", "--role", "scorer"]}
SECRET_KEY = re.compile(r"PASSWORD|PASS$|SECRET|TOKEN|API_?KEY|CREDENTIAL", re.IGNORECASE)
REQUIRED_VAR = re.compile(r"^\$\{[A-Z0-9_]+:\?[^}]*\}$")  # ${VAR:?message}: compose fails when unset
PINNED_IMAGE = re.compile(r"^[\w./-]+(:[\w.-]*\d+\.\d+[\w.-]*)?(@sha256:[0-9a-f]{64})?$")


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    return yaml.safe_load(COMPOSE.read_text())  # resolves the x-* anchors and << merges


@pytest.fixture(scope="module")
def validator() -> Draft202012Validator:
    schema = json.loads(SCHEMA.read_text())
    Draft202012Validator.check_schema(schema)
    return Draft202012Validator(schema)


def _errors(validator: Draft202012Validator, doc: dict[str, Any]) -> list[str]:
    return [f"{'/'.join(map(str, e.absolute_path)) or '<root>'}: {e.message}" for e in validator.iter_errors(doc)]


# ------------------------------------------------------------------------------- schema
def test_vendored_schema_is_the_recorded_one() -> None:
    assert hashlib.sha256(SCHEMA.read_bytes()).hexdigest() == SCHEMA_SHA256, (
        "tests/data/compose-spec.json changed: update SCHEMA_SHA256 and tests/data/README.md together"
    )


def test_compose_file_validates_against_the_compose_specification(
    compose: dict[str, Any], validator: Draft202012Validator
) -> None:
    assert _errors(validator, compose) == []


@pytest.mark.parametrize(
    "breakage",
    [
        lambda d: d["services"]["api"]["depends_on"]["postgres"].update(condition="service_up"),
        lambda d: d["services"]["scorer"].update(healthcheck={"test": ["CMD", "true"], "interval": 10}),
        lambda d: d["services"]["relay"].update(restart_policy="always"),
        lambda d: d["services"]["migrate"].update(command={"db": "upgrade"}),
    ],
    ids=["unknown-condition", "interval-not-a-duration", "unknown-key", "command-not-string-or-list"],
)
def test_schema_rejects_a_broken_compose_file(compose: dict[str, Any], validator: Draft202012Validator, breakage) -> None:  # type: ignore[no-untyped-def]
    broken = copy.deepcopy(compose)
    breakage(broken)
    assert _errors(validator, broken), "the schema check accepted a broken file: it could not fail"


# ------------------------------------------------------------------------------- deployment rules
def test_services_are_the_broker_the_store_a_migration_and_the_four_roles(compose: dict[str, Any]) -> None:
    services = compose["services"]
    assert set(services) == {"rabbitmq", "postgres", "migrate", *GATEWAY_ROLES}
    assert "management" in services["rabbitmq"]["image"]
    assert services["postgres"]["image"].startswith("postgres:")
    for name, command in GATEWAY_ROLES.items():
        assert services[name]["command"] == command, name
    assert services["migrate"]["command"] == ["db", "upgrade"]


def test_every_long_running_service_has_a_health_check(compose: dict[str, Any]) -> None:
    for name, svc in compose["services"].items():
        if name == "migrate":  # one-shot: waited for by service_completed_successfully
            continue
        hc = svc.get("healthcheck")
        assert hc and not hc.get("disable") and hc.get("test"), f"{name} has no health check"
    api_check = " ".join(compose["services"]["api"]["healthcheck"]["test"])
    assert "/readyz" in api_check
    for role in ("sources", "relay", "scorer"):
        svc = compose["services"][role]
        # The image's check asks $HEALTHCHECK_URL: the worker's own /metrics server on its metrics port.
        port = svc["environment"]["GATEWAY_RESILIENCE__METRICS_PORT"]
        assert svc["environment"]["HEALTHCHECK_URL"] == f"http://127.0.0.1:{port}/metrics", role
        assert "HEALTHCHECK_URL" in " ".join(svc["healthcheck"]["test"]), role


def test_gateway_services_wait_for_healthy_dependencies_and_the_migration(compose: dict[str, Any]) -> None:
    services = compose["services"]
    for name in GATEWAY_ROLES:
        deps = services[name]["depends_on"]
        assert deps["postgres"] == {"condition": "service_healthy"}, name
        assert deps["rabbitmq"] == {"condition": "service_healthy"}, name
        assert deps["migrate"] == {"condition": "service_completed_successfully"}, name
        # Only the one-shot migration migrates: roles starting side by side must not race Alembic.
        assert services[name]["environment"]["GATEWAY_STORE__AUTO_MIGRATE"] == "false", name
    assert services["migrate"]["depends_on"] == {"postgres": {"condition": "service_healthy"}}
    assert services["migrate"]["restart"] == "no"
    for name, svc in services.items():
        for dep, cond in svc.get("depends_on", {}).items():
            assert dep in services, f"{name} depends on unknown {dep}"
            if cond["condition"] == "service_healthy":
                assert services[dep].get("healthcheck", {}).get("test"), f"{name} waits for {dep}, which has no check"


def _environment(svc: dict[str, Any]) -> dict[str, str]:
    env = svc.get("environment") or {}
    if isinstance(env, list):
        env = dict(item.split("=", 1) for item in env)
    return {k: str(v) for k, v in env.items()}


def test_no_literal_secrets(compose: dict[str, Any]) -> None:
    for name, svc in compose["services"].items():
        for key, value in _environment(svc).items():
            if SECRET_KEY.search(key):
                assert REQUIRED_VAR.match(value), f"{name}: {key} must be ${{VAR:?...}} from the environment, not {value!r}"
    # Nor a password inside a URL anywhere in the file (user:secret@host).
    assert not re.search(r"://[^/\s:@]+:(?!\$\{)[^@\s]+@", COMPOSE.read_text())


def test_images_are_pinned(compose: dict[str, Any]) -> None:
    for name, svc in compose["services"].items():
        image = svc["image"]
        assert ":latest" not in image and ":" in image, f"{name}: {image} is not pinned"
        if "${" not in image:  # the gateway's own tag is ${GATEWAY_VERSION:-x.y.z}
            assert PINNED_IMAGE.match(image), f"{name}: {image} needs a version tag x.y[.z] or a digest"
        else:
            assert re.search(r":-\d+\.\d+\.\d+\}$", image), f"{name}: {image} needs a pinned default version"


def test_the_scorer_can_scale(compose: dict[str, Any]) -> None:
    scorer = compose["services"]["scorer"]
    assert "container_name" not in scorer, "a fixed container_name stops --scale scorer=N"
    assert not scorer.get("ports"), "a host port stops --scale scorer=N"
    assert scorer.get("deploy", {}).get("replicas", 1) >= 1


def test_gateway_config_is_mounted_read_only(compose: dict[str, Any]) -> None:
    for name in [*GATEWAY_ROLES, "migrate"]:
        svc = compose["services"][name]
        assert "./deploy/gateway.yaml:/etc/gateway/gateway.yaml:ro" in svc["volumes"], name
        assert svc["environment"]["GATEWAY_CONFIG"] == "/etc/gateway/gateway.yaml", name
    assert (ROOT / "deploy" / "gateway.yaml").is_file()


def _compose_plugin() -> bool:
    if shutil.which("docker") is None:
        return False
    probe = subprocess.run(["docker", "compose", "version"], check=False, capture_output=True, timeout=30)
    return probe.returncode == 0


def test_docker_compose_config_accepts_the_file(tmp_path: Path) -> None:
    if not _compose_plugin():
        pytest.skip("the docker client has no compose plugin here; the schema test above covers the file")
    env = {"PATH": "/usr/bin:/bin:/usr/local/bin", "HOME": str(tmp_path),
           "POSTGRES_PASSWORD": "x", "RABBITMQ_PASSWORD": "x"}
    ok = subprocess.run(["docker", "compose", "-f", str(COMPOSE), "config", "-q"], check=False, env=env, capture_output=True,
                        text=True, timeout=60)
    assert ok.returncode == 0, ok.stderr
    # And it refuses to start without the passwords (${VAR:?}).
    env.pop("POSTGRES_PASSWORD")
    missing = subprocess.run(["docker", "compose", "-f", str(COMPOSE), "config", "-q"], check=False, env=env, capture_output=True,
                             text=True, timeout=60)
    assert missing.returncode != 0 and "POSTGRES_PASSWORD" in missing.stderr


# ------------------------------------------------------------------------------- Dockerfile
def _instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) per instruction; continuation lines joined, comments dropped."""
    joined = re.sub(r"\\\n", " ", DOCKERFILE.read_text())
    out = []
    for line in joined.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            word, _, rest = line.partition(" ")
            out.append((word.upper(), rest.strip()))
    return out


def test_dockerfile_is_multi_stage_on_a_pinned_slim_base() -> None:
    ins = _instructions()
    args = dict(a.split("=", 1) for w, a in ins if w == "ARG" and "=" in a)
    froms = [a.split()[0] for w, a in ins if w == "FROM"]
    assert len(froms) >= 2, "expected a builder stage and a runtime stage"
    for ref in froms:
        image = args.get(ref[2:-1], "") if ref.startswith("${") else ref
        assert image, f"FROM {ref}: no default for the build argument"
        assert "slim" in image and ":latest" not in image, image
        assert re.match(r"^python:\d+\.\d+\.\d+-slim", image) or "@sha256:" in image, f"{image} is not pinned to a patch release"
    assert any(w == "RUN" and "pip wheel" in a for w, a in ins), "the builder should build wheels"
    assert any(w == "RUN" and "from=build" in a and "--no-index" in a for w, a in ins), "install from the builder's wheels only"


def test_dockerfile_runs_as_a_non_root_user_with_a_health_check() -> None:
    ins = _instructions()
    users = [a for w, a in ins if w == "USER"]
    assert users, "no USER: the image would run as root"
    user = users[-1].split(":")[0]
    assert user not in {"root", "0"}, users[-1]
    last_from = max(i for i, (w, _) in enumerate(ins) if w == "FROM")
    assert any(w == "USER" for w, _ in ins[last_from:]), "USER must be set in the runtime stage"
    assert any(w == "HEALTHCHECK" and "CMD" in a for w, a in ins[last_from:])
    assert [a for w, a in ins if w == "ENTRYPOINT"] == ['["gateway"]']


def test_dockerfile_and_context_hold_no_secrets() -> None:
    for word, rest in _instructions():
        if word in {"ENV", "ARG", "LABEL"}:
            assert not SECRET_KEY.search(rest), f"{word} {rest}"
    ignored = (ROOT / ".dockerignore").read_text().split()
    for entry in (".git", ".env", "tests", ".venv"):
        assert entry in ignored, f".dockerignore should exclude {entry}"
