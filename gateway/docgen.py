"""Generate ``docs/configuration.md`` from the pydantic models (``python -m gateway.docgen``)."""

from __future__ import annotations

import sys
import typing
from typing import Any

from pydantic import BaseModel
from pydantic_core import PydanticUndefined

from gateway.config import Settings

__all__ = ["render"]


def _type_name(annotation: Any) -> str:
    text = getattr(annotation, "__name__", None) if not typing.get_args(annotation) else None
    if text:
        return text
    return str(annotation).replace("typing.", "").replace("pydantic.types.", "")


def _model_of(annotation: Any) -> type[BaseModel] | None:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in typing.get_args(annotation):
        found = _model_of(arg)
        if found is not None:
            return found
    return None


def _rows(model: type[BaseModel], prefix: str, out: list[str], nested: list[tuple[str, type[BaseModel]]]) -> None:
    for name, field in model.model_fields.items():
        path = f"{prefix}{name}"
        sub = _model_of(field.annotation)
        if sub is not None and sub is not model:
            nested.append((path + ("[]" if typing.get_origin(field.annotation) is list else ""), sub))
            continue
        if field.default is not PydanticUndefined:
            default = repr(field.default)
            if "SecretStr" in default:
                default = "(secret)"
        elif field.default_factory is not None:
            default = repr(field.default_factory())  # type: ignore[call-arg]
        else:
            default = "**required**"
        desc = (field.description or "").replace("|", "\\|").replace("\n", " ")
        tname = _type_name(field.annotation).replace("|", "\\|")
        out.append(f"| `{path}` | `{tname}` | `{default}` | {desc} |")


def render_model(title: str, model: type[BaseModel], prefix: str = "") -> str:
    """Markdown tables for ``model`` and the models nested in it."""
    parts: list[str] = []
    queue: list[tuple[str, type[BaseModel]]] = [(prefix.rstrip("."), model)]
    while queue:
        path, m = queue.pop(0)
        rows: list[str] = []
        nested: list[tuple[str, type[BaseModel]]] = []
        _rows(m, f"{path}." if path else "", rows, nested)
        heading = f"### `{path}`" if path else f"## {title}"
        doc = (m.__doc__ or "").strip().splitlines()[0] if m.__doc__ else ""
        parts.append(f"{heading}\n\n{doc}\n\n| key | type | default | description |\n|---|---|---|---|\n" + "\n".join(rows))
        queue.extend(nested)
    return "\n\n".join(parts)


def render() -> str:
    """The whole configuration reference."""
    from gateway.plugins import adapter_names, load_adapter

    head = (
        "# Configuration reference\n\n"
        "Generated from the pydantic models by `python -m gateway.docgen > docs/configuration.md`; "
        "a test keeps it current.\n\n"
        "One YAML file (`-c FILE` or `$GATEWAY_CONFIG`) plus environment overrides: `GATEWAY_` + the "
        "path in upper case with `__` between levels, e.g. `GATEWAY_BUS__URL`, `GATEWAY_API__PORT`. "
        "Precedence: CLI flags, then environment, then the file. Secrets go in the environment and "
        "reach the file through `${VAR}` or `${VAR:-default}` interpolation (`VAR_FILE` naming a file "
        "works too); they are typed as secrets and never printed. A secret-named key (`password`, `secret`, "
        "`token`, `api_key`, `key_secret`, `passphrase`, `client_secret`, `private_key`) written literally into the file is "
        "refused by profile `prod` and logged as a warning in `dev` and `test`.\n"
    )
    body = [render_model("Gateway settings", Settings)]
    for name in adapter_names():
        cls = load_adapter(name)
        body.append(render_model(f"Adapter `{name}` (`sources[].config`)", cls.config_model, "").replace(
            "## Adapter", "## Adapter", 1))
    return head + "\n" + "\n\n".join(body) + "\n"


if __name__ == "__main__":
    sys.stdout.write(render())
