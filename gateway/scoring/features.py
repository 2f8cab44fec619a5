"""Automatic feature extraction from an event's ``data`` for the built-in anomaly model.

Rules (they are part of the model's behaviour, so changing them means a new model version):

* ``data`` must be a JSON object; anything else yields no features.
* Nested objects are flattened with dotted paths (``shipping.address.country``) up to
  :data:`MAX_DEPTH` levels of keys; deeper values and lists are ignored.
* Excluded: a key listed in ``exclude`` (matched against the key itself or its full dotted path),
  and keys that look like identifiers (``..._id``, camelCase ``...Id``) -- identifiers are unique
  per record, so their "surprise" carries no signal.
* Numeric: ``int``/``float`` (finite) and numeric strings such as exact decimals (``"123.45"``,
  ``"-1e3"``). A string with a leading zero and no decimal point (``"02139"``) is a code, not a
  number, and is treated as categorical.
* Categorical: ``bool`` and strings up to :data:`MAX_CATEGORY_LEN` characters (longer strings are
  free text and ignored). Whether a categorical field's cardinality is bounded is decided by the
  model, which drops fields with too many distinct values.
* ``None`` means "missing" and contributes nothing.
"""

from __future__ import annotations

import math
import re
from collections.abc import Collection
from functools import lru_cache
from dataclasses import dataclass, field
from typing import Any

__all__ = ["Features", "extract_features", "signed_log1p", "is_identifier_key", "MAX_DEPTH", "MAX_CATEGORY_LEN"]

MAX_DEPTH = 3
MAX_CATEGORY_LEN = 64
# Decimal or scientific notation; no leading zeros unless "0" or "0.xxx" (codes keep their zeros).
_NUMERIC = re.compile(r"^[+-]?(?:0|[1-9][0-9]*|0(?=\.)|[0-9]+(?=\.))(?:\.[0-9]+)?(?:[eE][+-]?[0-9]+)?$")
_CAMEL_ID = re.compile(r"[a-z0-9]Id$")


@dataclass(slots=True)
class Features:
    """Features of one event.

    Attributes:
        numeric: feature name -> (model-space value, raw value).
        categorical: feature name -> (category string, raw value).
    """

    numeric: dict[str, tuple[float, Any]] = field(default_factory=dict)
    categorical: dict[str, tuple[str, Any]] = field(default_factory=dict)


def signed_log1p(x: float) -> float:
    """``sign(x) * log(1 + |x|)``: makes heavy-tailed positives (amounts) near-Gaussian, keeps sign."""
    return math.copysign(math.log1p(abs(x)), x)


@lru_cache(maxsize=8192)
def is_identifier_key(key: str) -> bool:
    """Whether ``key`` names an identifier (``customer_id``, ``customerId``, ``ID``)."""
    low = key.lower()
    return low == "id" or low.endswith("_id") or bool(_CAMEL_ID.search(key))


def _as_number(value: Any) -> float | None:
    """The value as a finite float if it is numeric (number or numeric string), else ``None``."""
    kind = type(value)
    if kind is float:  # the common case first: JSON numbers
        return value if math.isfinite(value) else None
    if isinstance(value, bool):
        return None
    if isinstance(value, (int, float)):
        try:
            x = float(value)
        except OverflowError:  # ints beyond float range
            return None
        return x if math.isfinite(x) else None
    if isinstance(value, str) and 0 < len(value) <= 40 and _NUMERIC.match(value):
        try:
            x = float(value)
        except (OverflowError, ValueError):
            return None
        return x if math.isfinite(x) else None
    return None


def extract_features(data: Any, exclude: Collection[str] = ("id",)) -> Features:
    """Extract numeric and categorical features from one event's ``data``.

    Args:
        data: the event's ``data`` (any JSON value; only objects give features).
        exclude: keys or dotted paths never used as features.

    Returns:
        The event's features; empty when ``data`` is not an object.
    """
    out = Features()
    if isinstance(data, dict):
        _walk(data, "", 1, exclude, out)
    return out


def _walk(obj: dict[Any, Any], prefix: str, depth: int, exclude: Collection[str], out: Features) -> None:
    for key, value in obj.items():
        if value is None or not isinstance(key, str):
            continue
        path = prefix + key
        if key in exclude or path in exclude or is_identifier_key(key):
            continue
        if isinstance(value, dict):
            if depth < MAX_DEPTH:
                _walk(value, path + ".", depth + 1, exclude, out)
            continue
        number = _as_number(value)
        if number is not None:
            out.numeric[path] = (signed_log1p(number), value)
        elif isinstance(value, bool):
            out.categorical[path] = ("true" if value else "false", value)
        elif isinstance(value, str) and len(value) <= MAX_CATEGORY_LEN:
            out.categorical[path] = (value, value)
        # lists, long strings and huge numbers carry no usable feature here
