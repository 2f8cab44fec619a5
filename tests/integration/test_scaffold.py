"""``gateway adapter new`` generates a plugin that installs, is discovered, and passes its own tests.

The package is installed into a fresh virtual environment rather than into the running one
(tests/venvs.py: offline, the fresh venv sees this interpreter's packages through a ``.pth``).
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.venvs import EXAMPLE_DROPFOLDER, copy_example, fresh_venv, pip_install
from tests.venvs import run as _run

pytestmark = pytest.mark.integration


def test_generated_plugin_installs_is_discovered_and_passes_the_standard_suite(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from gateway.cli import app

    target = tmp_path / "erp-files"
    result = CliRunner().invoke(app, ["adapter", "new", "erp-files", "--dir", str(target)])
    assert result.exit_code == 0, result.output
    for rel in ("pyproject.toml", "README.md", "src/gateway_erp_files/source.py", "tests/test_contract.py"):
        assert (target / rel).is_file(), rel
    # A second run refuses to overwrite the package.
    again = CliRunner().invoke(app, ["adapter", "new", "erp-files", "--dir", str(target)])
    assert again.exit_code == 2

    python = fresh_venv(tmp_path / "venv")
    pip_install(python, target, tmp_path)

    # Discovery: the gateway's plugin lookup finds and loads the installed adapter by name.
    probe = _run([str(python), "-c", (
        "from gateway.plugins import adapter_names, load_adapter\n"
        "assert 'erp-files' in adapter_names(), adapter_names()\n"
        "cls = load_adapter('erp-files')\n"
        "print(cls.__module__, cls.kind)\n"
    )], tmp_path)
    assert probe.returncode == 0, probe.stdout + probe.stderr
    assert probe.stdout.split() == ["gateway_erp_files.source", "erp-files"]

    # Its tests (the standard suite) pass, run from the installed package, not the source folder.
    tests = _run([str(python), "-m", "pytest", "-q", "-p", "no:cacheprovider", str(target / "tests")], tmp_path)
    assert tests.returncode == 0, tests.stdout[-4000:] + tests.stderr[-2000:]
    assert " passed" in tests.stdout and "failed" not in tests.stdout
    assert "skipped" not in tests.stdout, "the template provides every hook: nothing may be skipped"

    # The pytest11 plugin marks the suite: -m adapter_contract selects the same checks.
    marked = _run([str(python), "-m", "pytest", "-q", "-p", "no:cacheprovider", "-m", "adapter_contract", str(target / "tests")], tmp_path)
    assert marked.returncode == 0, marked.stdout[-4000:] + marked.stderr[-2000:]  # 5 (nothing selected) fails too
    assert " passed" in marked.stdout and "failed" not in marked.stdout and "deselected" not in marked.stdout, (
        "every test of the generated package is a standard-suite check: " + marked.stdout[-2000:]
    )


def test_example_dropfolder_plugin_installs_is_discovered_and_passes_its_tests(tmp_path: Path) -> None:
    """examples/dropfolder, a third-party package, installs and passes the standard suite."""
    copy = copy_example(EXAMPLE_DROPFOLDER, tmp_path / "dropfolder")
    python = fresh_venv(tmp_path / "venv")
    pip_install(python, copy, tmp_path)
    probe = _run([str(python), "-c", "from gateway.plugins import load_adapter; print(load_adapter('dropfolder').kind)"], tmp_path)
    assert probe.returncode == 0 and probe.stdout.strip() == "dropfolder", probe.stdout + probe.stderr
    tests = _run([str(python), "-m", "pytest", "-q", "-p", "no:cacheprovider", str(copy / "tests")], tmp_path)
    assert tests.returncode == 0, tests.stdout[-4000:] + tests.stderr[-2000:]
    assert " passed" in tests.stdout
