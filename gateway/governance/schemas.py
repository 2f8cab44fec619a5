"""JSON Schema inference, evolution and validation messages for contracts.

* :func:`infer` / :func:`infer_many`: a schema from example values (``type``, ``properties``,
  ``required``, ``items`` only).
* :func:`evolve`: the schema widened just enough to accept one more value, with the list of
  changes -- or :class:`Incompatible` when the change is not additive. Additive means: a new
  optional field (also where ``additionalProperties`` is false), ``integer`` widened to
  ``number``, ``null`` added to a type, a type learned for a field only seen as ``null``, the
  item schema learned for an array only seen empty. Everything else (a required field missing, a
  string where an object was, a keyword such as ``pattern`` failing) is incompatible.
  Evolution only ever widens, so an evolved schema accepts every value the old one accepted.
* :func:`violations`: JSON Schema validation (the ``jsonschema`` package) turned into messages
  that name the field, what was expected and what came -- never the value itself, which may be
  personal data.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Iterable
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

from jsonschema import Draft202012Validator
from jsonschema.exceptions import SchemaError, ValidationError
from jsonschema.validators import validator_for

__all__ = [
    "Incompatible",
    "Violation",
    "check_schema",
    "evolve",
    "fingerprint",
    "infer",
    "infer_many",
    "json_type",
    "violations",
]


class Incompatible(ValueError):
    """A value the schema cannot be widened (additively) to accept.

    Attributes:
        path: where, e.g. ``data.customer.age``.
        expected: what the schema expects there.
        got: what the value is (its JSON type or ``absent``), never the value itself.
    """

    def __init__(self, path: str, expected: str, got: str) -> None:
        super().__init__(f"{path}: expected {expected}, got {got}")
        self.path, self.expected, self.got = path, expected, got


@dataclass(frozen=True, slots=True)
class Violation:
    """One validation failure: ``path``, what was ``expected`` and what was found (``got``)."""

    path: str
    expected: str
    got: str

    def __str__(self) -> str:
        return f"{self.path}: expected {self.expected}, got {self.got}"


def json_type(value: Any) -> str:
    """The JSON Schema type of a JSON value (integral floats are ``integer``, as in JSON Schema)."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int):
        return "integer"
    if isinstance(value, float):
        return "integer" if value.is_integer() else "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, (list, tuple)):
        return "array"
    if isinstance(value, dict):
        return "object"
    raise TypeError(f"not JSON data: {type(value).__name__}")


def fingerprint(schema: Any) -> str:
    """SHA-256 over the schema's canonical JSON (sorted keys): equal schemas, equal fingerprints."""
    return hashlib.sha256(json.dumps(schema, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def infer(value: Any, *, required: bool = True) -> dict[str, Any]:
    """The schema of one value; objects list their keys as ``required`` when ``required``."""
    t = json_type(value)
    if t == "object":
        props = {k: infer(v, required=required) for k, v in value.items()}
        out: dict[str, Any] = {"type": "object", "properties": props}
        if required and props:
            out["required"] = sorted(props)
        return out
    if t == "array":
        out = {"type": "array"}
        if value:
            out["items"] = infer_many(value, required=required)
        return out
    return {"type": t}


def infer_many(values: Iterable[Any], *, required: bool = True) -> dict[str, Any]:
    """A schema accepting every value: the first one's schema evolved by the others.

    Fields present in every object are ``required`` (when ``required``); the others optional.
    Values that cannot be merged additively (a string and an object at the same place) give a
    schema without a ``type`` there (anything goes), since examples cannot say which is right.
    """
    it = iter(values)
    try:
        schema: dict[str, Any] = infer(next(it), required=required)
    except StopIteration:
        return {}
    for v in it:
        schema = _merge_lenient(schema, v, required)
    return schema


def _merge_lenient(schema: dict[str, Any], value: Any, required: bool) -> dict[str, Any]:
    for _ in range(1000):  # each round loosens one more node, so this ends
        try:
            out, _changes = evolve(schema, value, "", required_missing_ok=True)
        except Incompatible as exc:
            loosened = _loosen(schema, exc.path.lstrip("."))
            if loosened == schema:
                return {}
            schema = loosened
            continue
        return out
    return {}


def _loosen(schema: dict[str, Any], path: str) -> dict[str, Any]:
    """``schema`` with the node at ``path`` (``.key`` and ``[i]`` steps, from :func:`evolve`) replaced by ``{}``."""
    steps = [(k, i) for k, i in re.findall(r"\.([^.\[]+)|\[(\d+)\]", "." + path if path[:1] not in ".[" else path)]
    if not steps:
        return {}
    node = json.loads(json.dumps(schema))
    parent: Any = None
    slot: tuple[Any, str] | None = None
    cur: Any = node
    for key, _index in steps:
        if not isinstance(cur, dict):
            return {}
        holder = cur.get("properties") if key else cur
        name = key if key else "items"
        if not isinstance(holder, dict) or name not in holder:
            return {}
        parent, slot = holder, (holder, name)
        cur = holder[name]
    assert slot is not None and parent is not None
    slot[0][slot[1]] = {}
    return node


def _types(node: dict[str, Any]) -> list[str] | None:
    t = node.get("type")
    if t is None:
        return None
    return [t] if isinstance(t, str) else list(t)


def _type_ok(vt: str, types: list[str]) -> bool:
    return vt in types or (vt == "integer" and "number" in types)


def _widen(types: list[str], vt: str) -> list[str] | None:
    if vt == "null":
        return [*types, "null"]
    if vt == "number" and "integer" in types:
        return ["number" if t == "integer" else t for t in types]
    if types == ["null"]:
        return [vt, "null"]
    return None


def evolve(
    schema: Any, value: Any, path: str = "data", *, required_missing_ok: bool = False
) -> tuple[Any, list[str]]:
    """Widen ``schema`` to accept ``value`` (see the module docstring).

    Args:
        schema: the current schema (not changed; the result shares untouched parts).
        value: the JSON value.
        path: the value's location, for messages.
        required_missing_ok: a missing required field drops it from ``required`` instead of
            being incompatible (used by inference, never by contracts).

    Returns:
        ``(schema, changes)``: the input schema itself and ``[]`` when nothing changed.

    Raises:
        Incompatible: the value needs a change that is not additive.
    """
    changes: list[str] = []
    return _evolve(schema, value, path, changes, required_missing_ok), changes


def _evolve(node: Any, value: Any, path: str, changes: list[str], lenient: bool) -> Any:
    if node is True or node == {}:
        return node
    if node is False:
        raise Incompatible(path, "nothing (the schema is false)", json_type(value))
    if not isinstance(node, dict):
        return node
    vt = json_type(value)
    types = _types(node)
    if types is not None and not _type_ok(vt, types):
        widened = _widen(types, vt)
        if widened is None:
            raise Incompatible(path, "type " + " or ".join(types), vt)
        changes.append(f"widened {path or '<root>'}: {'|'.join(types)} -> {'|'.join(widened)}")
        node = {**node, "type": widened[0] if len(widened) == 1 else widened}
        if types == ["null"] and vt in ("object", "array"):  # learn the structure too
            learned = infer(value, required=False)
            node = {**learned, **node}
            return node
    if vt == "object" and (types is None or "object" in types or "properties" in node):
        node = _evolve_object(node, value, path, changes, lenient)
    elif vt == "array" and (types is None or "array" in types or "items" in node):
        node = _evolve_array(node, value, path, changes, lenient)
    return node


def _evolve_object(node: dict[str, Any], value: dict[str, Any], path: str, changes: list[str], lenient: bool) -> Any:
    props: dict[str, Any] = node.get("properties", {}) if isinstance(node.get("properties"), dict) else {}
    new_props: dict[str, Any] | None = None
    required = node.get("required") or []
    missing = [r for r in required if r not in value]
    if missing:
        if not lenient:
            raise Incompatible(f"{path}.{missing[0]}", "a required field", "absent")
        node = {**node, "required": [r for r in required if r in value]}
        if not node["required"]:
            del node["required"]
    patterns = node.get("patternProperties") or {}
    additional = node.get("additionalProperties", True)
    for k, v in value.items():
        sub_path = f"{path}.{k}"
        if k in props:
            new = _evolve(props[k], v, sub_path, changes, lenient)
            if new is not props[k]:
                new_props = dict(props) if new_props is None else new_props
                new_props[k] = new
            continue
        if any(re.search(p, k) for p in patterns):
            continue  # described by patternProperties: validation decides
        if isinstance(additional, dict) and additional:
            continue  # described by an additionalProperties schema: validation decides
        new_props = dict(props) if new_props is None else new_props
        new_props[k] = infer(v, required=False)
        changes.append(f"added optional field {sub_path} ({json_type(v)})")
    if new_props is not None:
        node = {**node, "properties": new_props}
    return node


def _evolve_array(node: dict[str, Any], value: list[Any], path: str, changes: list[str], lenient: bool) -> Any:
    items = node.get("items")
    if items is None and "prefixItems" not in node:
        if value:
            node = {**node, "items": infer_many(value, required=False)}
            changes.append(f"learned the items of {path}")
        return node
    if isinstance(items, dict):
        new = items
        for i, v in enumerate(value):
            new = _evolve(new, v, f"{path}[{i}]", changes, lenient)
        if new is not items:
            node = {**node, "items": new}
    return node


# ------------------------------------------------------------------------ validation
@lru_cache(maxsize=1024)
def _validator(text: str) -> Any:
    schema = json.loads(text)
    cls = validator_for(schema, default=Draft202012Validator)
    return cls(schema, format_checker=cls.FORMAT_CHECKER)


def check_schema(schema: Any) -> None:
    """Raise ValueError (with the reason) when ``schema`` is not a valid JSON Schema."""
    if not isinstance(schema, (dict, bool)):
        raise ValueError(f"a JSON Schema is an object or a boolean, got {type(schema).__name__}")  # noqa: TRY004 -- config validation expects ValueError
    cls = validator_for(schema, default=Draft202012Validator) if isinstance(schema, dict) else Draft202012Validator
    try:
        cls.check_schema(schema)
    except SchemaError as exc:
        where = "/".join(str(p) for p in exc.absolute_path) or "<root>"
        raise ValueError(f"not a valid JSON Schema at {where}: {exc.message}") from None


def _where(root: str, err: ValidationError) -> str:
    out = root
    for part in err.absolute_path:
        out += f"[{part}]" if isinstance(part, int) else f".{part}"
    return out


def _describe(err: ValidationError, root: str) -> Violation:
    where = _where(root, err)
    inst = err.instance
    v, vv = err.validator, err.validator_value
    try:
        got = json_type(inst)
    except TypeError:
        got = type(inst).__name__
    if v == "type":
        return Violation(where, "type " + (" or ".join(vv) if isinstance(vv, list) else str(vv)), got)
    if v == "required" and isinstance(inst, dict):
        missing = [r for r in vv if r not in inst]
        return Violation(f"{where}.{missing[0]}" if missing else where, "a required field", "absent")
    if v == "additionalProperties" and isinstance(inst, dict):
        props = err.schema.get("properties", {}) if isinstance(err.schema, dict) else {}
        extra = [k for k in inst if k not in props]
        return Violation(f"{where}.{extra[0]}" if extra else where, "no such field (additionalProperties is false)",
                         "a field")
    shown = json.dumps(vv, default=str)
    if len(shown) > 120:
        shown = shown[:117] + "..."
    return Violation(where, f"'{v}': {shown}", f"a {got} that does not satisfy it")


def violations(schema: Any, value: Any, root: str = "data", limit: int = 5) -> list[Violation]:
    """Up to ``limit`` violations of ``schema`` by ``value`` (empty when it conforms), deepest first."""
    validator = _validator(json.dumps(schema, sort_keys=True))
    errors = sorted(validator.iter_errors(value), key=lambda e: (-len(e.absolute_path), list(map(str, e.absolute_path))))
    return [_describe(e, root) for e in errors[:limit]]
