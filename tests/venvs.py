"""Fresh virtual environments for plugin tests, built without network access.

A plugin is installed into a fresh venv rather than into the running one, so a failed run leaves
nothing behind and parallel runs cannot see each other's plugin. The fresh environment sees the
running one's packages (legacy-gateway, pytest, cloudevents) through a ``.pth`` file that calls
``site.addsitedir`` on them: ``venv --system-site-packages`` would not do, because from inside a
venv it exposes the *base* interpreter's packages, not the venv's. ``site.addsitedir`` also runs
that folder's ``.pth`` files, so an editable install of legacy-gateway works there too. Installing
uses ``--no-build-isolation --no-deps --no-index``: no network.
"""

from __future__ import annotations

import os
import shutil
import site
import subprocess
import venv
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
EXAMPLE_DROPFOLDER = REPO / "examples" / "dropfolder"


def clean_env() -> dict[str, str]:
    """This process's environment without PYTHON*/PYTEST* variables (they would leak into the child)."""
    return {k: v for k, v in os.environ.items() if not k.startswith(("PYTHON", "PYTEST"))}


def run(args: list[str], cwd: Path, timeout: float = 180) -> subprocess.CompletedProcess[str]:
    """Run a command with :func:`clean_env`, capturing its output as text."""
    return subprocess.run(args, check=False, cwd=cwd, env=clean_env(), capture_output=True, text=True, timeout=timeout)


def fresh_venv(where: Path) -> Path:
    """A venv without pip whose interpreter also sees this interpreter's site-packages; returns its python."""
    venv.EnvBuilder(with_pip=False, clear=True).create(where)
    python = where / ("Scripts/python.exe" if os.name == "nt" else "bin/python")
    purelib = run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], where).stdout.strip()
    parents = [p for p in site.getsitepackages() if Path(p).is_dir()]
    lines = "".join(f"import site; site.addsitedir({p!r})\n" for p in parents)
    (Path(purelib) / "_parent_env.pth").write_text(lines, encoding="utf-8")
    return python


def pip_install(python: Path, package: Path, cwd: Path) -> None:
    """Install ``package`` (a folder) into the venv of ``python``, offline; fails the test with pip's output."""
    install = run([str(python), "-m", "pip", "install", "--no-deps", "--no-build-isolation", "--no-index", "-q",
                   str(package)], cwd)
    assert install.returncode == 0, install.stdout + install.stderr


def copy_example(src: Path, dest: Path) -> Path:
    """A copy of an example package to build from: no build/ or egg-info left in the checkout."""
    shutil.copytree(src, dest, ignore=shutil.ignore_patterns("__pycache__", "build", "*.egg-info"))
    return dest
