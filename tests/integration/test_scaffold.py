"""``gateway adapter new`` generates a plugin that installs, is discovered, and passes its own tests.

The package is installed into a fresh virtual environment rather than into the running one, so
a failed run leaves nothing behind and parallel runs cannot see each other's plugin. The fresh
environment sees the running one's packages (legacy-gateway, pytest, cloudevents) through a
``.pth`` file that calls ``site.addsitedir`` on them: ``venv --system-site-packages`` would not
do, because from inside a venv it exposes the *base* interpreter's packages, not the venv's.
``site.addsitedir`` also runs that folder's ``.pth`` files, so an editable install of
legacy-gateway works there too. Installing uses ``--no-build-isolation --no-deps``: no network.
"""

from __future__ import annotations

import os
import site
import subprocess
import sys
import venv
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration


def _run(args: list[str], cwd: Path, timeout: float = 180) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTHON", "PYTEST"))}
    return subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


def _fresh_venv(where: Path) -> Path:
    """A venv without pip whose interpreter also sees this interpreter's site-packages; returns its python."""
    venv.EnvBuilder(with_pip=False, clear=True).create(where)
    python = where / ("Scripts/python.exe" if os.name == "nt" else "bin/python")
    purelib = _run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], where).stdout.strip()
    parents = [p for p in site.getsitepackages() if Path(p).is_dir()]
    lines = "".join(f"import site; site.addsitedir({p!r})\n" for p in parents)
    (Path(purelib) / "_parent_env.pth").write_text(lines, encoding="utf-8")
    return python


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

    python = _fresh_venv(tmp_path / "venv")
    install = _run([str(python), "-m", "pip", "install", "--no-deps", "--no-build-isolation", "--no-index", "-q", str(target)], tmp_path)
    assert install.returncode == 0, install.stdout + install.stderr

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
    assert marked.returncode == 0, marked.stdout[-4000:] + marked.stderr[-2000:]


def test_example_dropfolder_plugin_installs_is_discovered_and_passes_its_tests(tmp_path: Path) -> None:
    """examples/dropfolder, a third-party package, installs and passes the standard suite."""
    example = Path(__file__).resolve().parents[2] / "examples" / "dropfolder"
    copy = tmp_path / "dropfolder"  # build from a copy: no build/ or egg-info in the checkout
    import shutil

    shutil.copytree(example, copy, ignore=shutil.ignore_patterns("__pycache__", "build", "*.egg-info"))
    python = _fresh_venv(tmp_path / "venv")
    install = _run([str(python), "-m", "pip", "install", "--no-deps", "--no-build-isolation", "--no-index", "-q", str(copy)], tmp_path)
    assert install.returncode == 0, install.stdout + install.stderr
    probe = _run([str(python), "-c", "from gateway.plugins import load_adapter; print(load_adapter('dropfolder').kind)"], tmp_path)
    assert probe.returncode == 0 and probe.stdout.strip() == "dropfolder", probe.stdout + probe.stderr
    tests = _run([str(python), "-m", "pytest", "-q", "-p", "no:cacheprovider", str(copy / "tests")], tmp_path)
    assert tests.returncode == 0, tests.stdout[-4000:] + tests.stderr[-2000:]
    assert " passed" in tests.stdout
