"""A worker whose metrics port is taken stops with a clear error instead of running half-started."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

from tests.rabbit import delete_broker_objects

pytestmark = pytest.mark.integration


def test_a_taken_metrics_port_stops_the_worker_with_exit_1(amqp_url: str, tmp_path: Path) -> None:
    from gateway.bus import Topology

    prefix = f"gwtest-{uuid.uuid4().hex[:8]}"
    cfg = tmp_path / "gw.yaml"
    cfg.write_text(f"profile: test\nstore: {{url: 'sqlite:///{tmp_path / 'g.db'}'}}\nbus: {{url: '{amqp_url}', prefix: {prefix}}}\n")
    with socket.socket() as taken:
        taken.bind(("0.0.0.0", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        env = {**os.environ, "GATEWAY_RESILIENCE__METRICS_PORT": str(port)}
        try:
            proc = subprocess.run(
                [sys.executable, "-m", "gateway", "worker", "--role", "relay", "-c", str(cfg)],
                env=env, capture_output=True, text=True, timeout=60,
            )
        finally:
            delete_broker_objects(amqp_url, Topology(prefix))
    assert proc.returncode == 1, proc.stderr[-2000:]
    assert f"resilience.metrics_port {port}: cannot serve /metrics" in proc.stderr
