"""Feature extraction defined in configuration, for models trained offline (ONNX and the like).

A feature spec is a list of features; each names a path into the event, a type and, for
categories, an encoding. The extractor turns a batch of events into a float32 matrix whose
columns always come in the same order (the order of the spec, then the order of each feature's
columns), so a model trained on ``FeatureExtractor(spec).extract(events).matrix`` sees exactly the
columns the gateway feeds it at scoring time.

Rules (they decide what a model sees, so train with the same extractor):

* ``path`` is ``type``, ``source``, ``subject``, or ``data`` followed by dotted keys
  (``data.customer.country``); a purely numeric key indexes a list (``data.items.0.price``).
* A missing key, a path through a non-object and a JSON ``null`` all mean *missing*: the feature's
  ``default`` is used, and without a default the event fails with a :class:`ContractError` that
  names the event id and the path (the worker dead-letters that event alone).
* ``number``: an int or float, or a decimal string (``"12.50"``, ``"-1e3"``; surrounding blanks
  ignored). Anything else (text, booleans, ``NaN``/``Infinity``) is a :class:`ContractError`.
  One column, named after the feature.
* ``boolean``: ``true``/``false``, the integers 0 and 1, or the strings ``"true"``, ``"false"``,
  ``"1"``, ``"0"`` (any case); 1.0 or 0.0 in one column named after the feature.
* ``category``: a string, integer or boolean, compared as text (``true``/``false`` for booleans,
  ``7`` for ``7`` and ``7.0``). Encodings:

  - ``one_hot: {categories: [...]}``: one column per listed category, named ``<name>=<category>``,
    1.0 in the matching column. A category not in the list gives **all zeros** (no error: new
    values appear in production, and "none of the known ones" is what the model learns for them
    if the training data has such rows).
  - ``hash: {buckets: N}``: N columns named ``<name>#<i>``, 1.0 in column
    ``int.from_bytes(blake2b(text.encode("utf-8"), digest_size=8).digest(), "big") % N``
    (see :func:`hash_bucket`). Deterministic across processes and machines (Python's ``hash()``
    is salted per process and is never used).
"""

from __future__ import annotations

import hashlib
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Annotated, Any, Literal, get_args

import numpy as np
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    TypeAdapter,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from gateway.errors import ConfigurationError, ContractError
from gateway.events import Event

__all__ = [
    "CategoryEncoding",
    "Extraction",
    "FeatureExtractor",
    "FeatureSpec",
    "HashEncoding",
    "OneHotEncoding",
    "configuration_error",
    "hash_bucket",
]

#: First segments a feature path may start with.
PATH_ROOTS = ("data", "type", "source", "subject")
_DECIMAL = re.compile(r"^[+-]?(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)(?:[eE][+-]?[0-9]+)?$")
_BOOL_TEXT = {"true": True, "false": False, "1": True, "0": False}
_MISSING = object()

FeatureValue = float | str | bool


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


def _category_text(value: Any) -> str | None:
    """A category value as text, ``None`` when it cannot be a category (objects, lists, NaN)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return value
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float) and math.isfinite(value):
        return str(int(value)) if value.is_integer() else repr(value)
    return None


class OneHotEncoding(_Strict):
    """One column per known category; an unknown category gives all zeros."""

    categories: list[str | bool | int] = Field(
        min_length=1, description="The known categories, in column order (compared as text)."
    )

    @field_validator("categories")
    @classmethod
    def _unique_text(cls, value: list[str | bool | int]) -> list[str]:
        texts = [str(_category_text(v)) for v in value]
        dupes = sorted({t for t in texts if texts.count(t) > 1})
        if dupes:
            raise ValueError(f"categories must be unique, these repeat: {', '.join(dupes)}")
        return texts


class HashEncoding(_Strict):
    """``buckets`` indicator columns; the bucket is a stable hash of the category text."""

    buckets: int = Field(ge=1, le=1_000_000, description="Number of hash buckets (columns).")


class CategoryEncoding(_Strict):
    """Exactly one of ``one_hot`` or ``hash``."""

    one_hot: OneHotEncoding | None = Field(None, description="One-hot over a fixed list of categories.")
    hash: HashEncoding | None = Field(None, description="Feature hashing into a fixed number of buckets.")

    @model_validator(mode="after")
    def _exactly_one(self) -> CategoryEncoding:
        if (self.one_hot is None) == (self.hash is None):
            raise ValueError("expected exactly one of one_hot: {categories: [...]} or hash: {buckets: N}")
        return self


class FeatureSpec(_Strict):
    """One configured feature: where it is in the event, its type, default and encoding."""

    name: str = Field(min_length=1, max_length=200, description="Feature name, used in column names and explanations.")
    path: str = Field(description="type, source, subject, or data.<key>[.<key>...] (a numeric key indexes a list).")
    type: Literal["number", "category", "boolean"] = Field(description="How the value is read and encoded.")
    default: Any = Field(
        None, description="Value used when the path is missing or null; without one, such an event fails."
    )
    encoding: CategoryEncoding | None = Field(
        None, validate_default=True, description="For category features only: one_hot or hash."
    )

    @field_validator("path")
    @classmethod
    def _known_root(cls, value: str) -> str:
        parts = value.split(".")
        if parts[0] not in PATH_ROOTS or any(not p for p in parts) or (parts[0] != "data" and len(parts) > 1):
            raise ValueError("expected type, source, subject or data.<key>[.<key>...]")
        return value

    @field_validator("default")
    @classmethod
    def _default_fits_type(cls, value: Any, info: ValidationInfo) -> Any:
        kind = info.data.get("type")
        if value is None or kind is None:
            return value
        try:
            return _parse(kind, value)
        except ValueError as exc:
            raise ValueError(f"default {value!r} does not fit a {kind} feature: {exc}") from None

    @field_validator("encoding")
    @classmethod
    def _encoding_only_for_categories(
        cls, value: CategoryEncoding | None, info: ValidationInfo
    ) -> CategoryEncoding | None:
        kind = info.data.get("type")
        if kind == "category" and value is None:
            raise ValueError("a category feature needs an encoding: one_hot: {categories: [...]} or hash: {buckets: N}")
        if kind in ("number", "boolean") and value is not None:
            raise ValueError(f"only category features take an encoding, this one is a {kind}")
        return value


def hash_bucket(text: str, buckets: int) -> int:
    """The hash bucket of a category text: BLAKE2b (8 bytes, big-endian) modulo ``buckets``."""
    digest = hashlib.blake2b(text.encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(digest, "big") % buckets


def _parse(kind: str, value: Any) -> FeatureValue:
    """``value`` read as a ``kind`` feature value; ValueError says what was expected."""
    if kind == "number":
        if isinstance(value, bool):
            raise ValueError("expected a number, got a boolean")
        if isinstance(value, (int, float)):
            number = float(value)
        elif isinstance(value, str) and _DECIMAL.match(value.strip()):
            number = float(value.strip())
        else:
            raise ValueError("expected a number or a decimal string such as \"12.50\"")
        if not math.isfinite(number):
            raise ValueError("expected a finite number")
        return number
    if kind == "boolean":
        if isinstance(value, bool):
            return value
        if isinstance(value, int) and value in (0, 1):
            return bool(value)
        if isinstance(value, str) and value.strip().lower() in _BOOL_TEXT:
            return _BOOL_TEXT[value.strip().lower()]
        raise ValueError("expected true/false, 0/1 or the strings \"true\"/\"false\"")
    text = _category_text(value)
    if text is None:
        raise ValueError("expected a string, integer or boolean category")
    return text


def _lookup(event: Event, parts: tuple[str, ...]) -> Any:
    """The value at ``parts`` in ``event``, or ``_MISSING``."""
    root = parts[0]
    if root != "data":
        value = getattr(event, root)
        return _MISSING if value is None else value
    current: Any = event.data
    for key in parts[1:]:
        if isinstance(current, Mapping):
            current = current.get(key, _MISSING)
        elif isinstance(current, list) and key.isdigit() and int(key) < len(current):
            current = current[int(key)]
        else:
            return _MISSING
        if current is _MISSING:
            return _MISSING
    return _MISSING if current is None else current


_SPEC_LIST: TypeAdapter[list[FeatureSpec]] = TypeAdapter(Annotated[list[FeatureSpec], Field(min_length=1)])


@dataclass(frozen=True, slots=True)
class _Compiled:
    """A feature ready to fill its columns of a row."""

    spec: FeatureSpec
    parts: tuple[str, ...]
    offset: int
    width: int
    one_hot: dict[str, int] | None
    buckets: int | None

    def fill(self, value: FeatureValue, row: np.ndarray) -> None:
        """Write the encoded ``value`` into this feature's columns of ``row`` (zeros already)."""
        if self.one_hot is not None:
            index = self.one_hot.get(str(value))
            if index is not None:  # unknown category: all zeros (module docstring)
                row[self.offset + index] = 1.0
        elif self.buckets is not None:
            row[self.offset + hash_bucket(str(value), self.buckets)] = 1.0
        else:
            row[self.offset] = float(value)


@dataclass(frozen=True, slots=True)
class Extraction:
    """Features of a batch.

    Attributes:
        matrix: float32 array of shape (events, columns).
        values: per event, feature name -> the value used (after parsing; the default if missing).
    """

    matrix: np.ndarray
    values: list[dict[str, FeatureValue]]


class FeatureExtractor:
    """Turns events into a model's input matrix according to a feature spec.

    Stateless and thread-safe. Build it with :meth:`from_config` from configuration (errors are
    :class:`ConfigurationError` naming the option path) or directly from :class:`FeatureSpec`s.

    Attributes:
        features: the specs, in order.
        columns: column names in matrix order (``amount``, ``country=DE``, ``merchant#3``).
    """

    def __init__(self, features: Sequence[FeatureSpec]) -> None:
        """Compile ``features`` (validated specs); duplicate names are a :class:`ConfigurationError`."""
        names = [f.name for f in features]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ConfigurationError(f"feature names must be unique, these repeat: {', '.join(dupes)}")
        if not features:
            raise ConfigurationError("the feature spec is empty; expected at least one feature")
        self.features = tuple(features)
        compiled: list[_Compiled] = []
        columns: list[str] = []
        for spec in self.features:
            one_hot = buckets = None
            if spec.encoding is not None and spec.encoding.one_hot is not None:
                cats = [str(c) for c in spec.encoding.one_hot.categories]
                one_hot = {c: i for i, c in enumerate(cats)}
                columns += [f"{spec.name}={c}" for c in cats]
            elif spec.encoding is not None and spec.encoding.hash is not None:
                buckets = spec.encoding.hash.buckets
                columns += [f"{spec.name}#{i}" for i in range(buckets)]
            else:
                columns.append(spec.name)
            offset = compiled[-1].offset + compiled[-1].width if compiled else 0
            compiled.append(
                _Compiled(spec, tuple(spec.path.split(".")), offset, len(columns) - offset, one_hot, buckets)
            )
        self._compiled = tuple(compiled)
        self.columns = tuple(columns)

    @classmethod
    def from_config(cls, features: Any, where: str = "features") -> FeatureExtractor:
        """Validate a feature spec from configuration (a list of mappings).

        Args:
            features: the configured list.
            where: the option path used in error messages, e.g.
                ``scoring.models.fraud.options.features``.

        Raises:
            ConfigurationError: naming ``<where>.<index>.<field>``, what was wrong and what was
                expected.
        """
        try:
            specs = _SPEC_LIST.validate_python(features)
        except ValidationError as exc:
            raise configuration_error(where, exc, list[FeatureSpec]) from None
        try:
            return cls(specs)
        except ConfigurationError as exc:
            raise ConfigurationError(f"{where}: {exc}") from None

    @property
    def width(self) -> int:
        """Number of columns."""
        return len(self.columns)

    def values(self, event: Event) -> dict[str, FeatureValue]:
        """The feature values of one event (name -> parsed value or default).

        Raises:
            ContractError: a feature without default is missing, or a value does not fit its
                type; the message names the event id and the path.
        """
        out: dict[str, FeatureValue] = {}
        for c in self._compiled:
            raw = _lookup(event, c.parts)
            if raw is _MISSING:
                if c.spec.default is None:
                    raise ContractError(
                        f"event {event.id}: feature {c.spec.name!r}: {c.spec.path} is missing and has no default"
                    )
                out[c.spec.name] = c.spec.default
                continue
            try:
                out[c.spec.name] = _parse(c.spec.type, raw)
            except ValueError as exc:
                shown = repr(raw) if len(repr(raw)) <= 60 else repr(raw)[:57] + "..."
                raise ContractError(
                    f"event {event.id}: feature {c.spec.name!r}: {c.spec.path} = {shown}: {exc}"
                ) from None
        return out

    def extract(self, events: Sequence[Event]) -> Extraction:
        """The float32 matrix (events x columns) and the values used, for a batch.

        Raises:
            ContractError: as :meth:`values`, for the first bad event.
        """
        matrix = np.zeros((len(events), self.width), dtype=np.float32)
        values = [self.values(e) for e in events]
        for row, vals in zip(matrix, values):
            for c in self._compiled:
                c.fill(vals[c.spec.name], row)
        return Extraction(matrix, values)


def _unwrap(annotation: Any) -> type[BaseModel] | None:
    """The first pydantic model inside an annotation (``Optional``, ``list``, unions, ``Annotated``)."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in get_args(annotation):
        found = _unwrap(arg)
        if found is not None:
            return found
    return None


def _allowed_fields(root: Any, loc: Sequence[str | int]) -> list[str] | None:
    """The field names of the model at ``loc`` under the annotation ``root``, best effort."""
    current = _unwrap(root)
    for part in loc:
        if isinstance(part, int):
            continue
        if current is None or part not in current.model_fields:
            return None
        current = _unwrap(current.model_fields[part].annotation)
    return list(current.model_fields) if current is not None else None


def configuration_error(prefix: str, exc: ValidationError, root: Any = None) -> ConfigurationError:
    """A pydantic validation error as one :class:`ConfigurationError`, one line per problem.

    Args:
        prefix: option path of the validated value, e.g. ``scoring.models.fraud.options``.
        exc: the error.
        root: the validated model class (or annotation such as ``list[FeatureSpec]``), used to
            list the expected fields when a key is unknown.

    Returns:
        An error whose lines read ``<prefix>.<field path>: <what is wrong> (got <value>)``.
    """
    lines = []
    for err in exc.errors():
        # Drop pydantic's union-member tags ("function-after[...]", "MinMaxTransform", "[name]"):
        # option paths hold field names (lowercase) and list indexes only.
        loc = [p for p in err["loc"] if isinstance(p, int) or not ("[" in p or p[:1].isupper())]
        path = ".".join([prefix] * bool(prefix) + [str(p) for p in loc])
        msg = err["msg"].removeprefix("Value error, ")
        if err["type"] == "extra_forbidden":
            allowed = _allowed_fields(root, loc[:-1]) if root is not None else None
            msg = "unknown option" + (f"; expected one of: {', '.join(allowed)}" if allowed else "")
        elif err["type"] == "missing":
            msg = "required option is missing"
        else:
            shown = repr(err.get("input"))
            msg += f" (got {shown if len(shown) <= 60 else shown[:57] + '...'})"
        lines.append(f"{path}: {msg}")
    return ConfigurationError("; ".join(lines))
