"""``gateway adapter new NAME``: scaffold an adapter plugin package that passes the standard suite.

The templates (``templates/*.tmpl``, package data) are rendered with :class:`string.Template`:
``${name}`` placeholders, ``$$`` for a literal dollar sign.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from importlib.resources import files
from pathlib import Path
from string import Template

__all__ = ["PluginNames", "names_for", "render_plugin"]

_NAME = re.compile(r"^[a-z][a-z0-9]*(?:[-_][a-z0-9]+)*$")

#: template file -> path in the generated package (``{package}`` is the import package).
_FILES = {
    "pyproject.toml.tmpl": "pyproject.toml",
    "README.md.tmpl": "README.md",
    "package_init.py.tmpl": "src/{package}/__init__.py",
    "source.py.tmpl": "src/{package}/source.py",
    "test_contract.py.tmpl": "tests/test_contract.py",
    "gitignore.tmpl": ".gitignore",
}


@dataclass(frozen=True)
class PluginNames:
    """The names one adapter name gives a plugin package.

    Attributes:
        adapter: the entry-point name users write as ``adapter:`` (``erp-files``).
        distribution: the pip name (``gateway-erp-files``).
        package: the import package (``gateway_erp_files``).
        source_class: the adapter class (``ErpFilesSource``).
        config_class: its config model (``ErpFilesConfig``).
    """

    adapter: str
    distribution: str
    package: str
    source_class: str
    config_class: str


def names_for(name: str) -> PluginNames:
    """Derive the package's names from an adapter name.

    Args:
        name: lowercase letters and digits, words separated by ``-`` or ``_`` (``erp-files``).

    Raises:
        ValueError: the name does not have that form.
    """
    if not _NAME.match(name):
        raise ValueError(f"adapter name {name!r}: use lowercase letters and digits, words separated by - or _ (e.g. erp-files)")
    words = re.split(r"[-_]", name)
    camel = "".join(w.capitalize() for w in words)
    return PluginNames(
        adapter=name, distribution="gateway-" + "-".join(words), package="gateway_" + "_".join(words),
        source_class=f"{camel}Source", config_class=f"{camel}Config",
    )


def render_plugin(name: str, target: Path, *, force: bool = False) -> list[Path]:
    """Write a new plugin package for adapter ``name`` into ``target``.

    Args:
        name: the adapter name (see :func:`names_for`).
        target: the folder to create; it must not exist or be empty unless ``force``.
        force: write into a non-empty folder, overwriting the generated files.

    Returns:
        The files written.

    Raises:
        ValueError: a bad name.
        FileExistsError: ``target`` is not empty and ``force`` is not set.
    """
    names = names_for(name)
    if target.exists() and any(target.iterdir()) and not force:
        raise FileExistsError(f"{target} exists and is not empty (use --force to write into it)")
    values = {
        "adapter": names.adapter, "distribution": names.distribution, "package": names.package,
        "source_class": names.source_class, "config_class": names.config_class,
    }
    templates = files(__package__).joinpath("templates")
    written = []
    for template, dest in _FILES.items():
        text = Template(templates.joinpath(template).read_text(encoding="utf-8")).substitute(values)
        path = target / dest.format(package=names.package)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")
        written.append(path)
    return written
