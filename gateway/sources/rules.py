"""Parse rules for legacy field values (``mapping.parse``), applied before a record is mapped.

Legacy systems store dates as ``'YYYYMMDD'`` text, amounts as zero-padded digits with an implied
decimal point, flags as ``'Y'``/``'N'`` and "no date" as ``'00000000'``. A source's ``mapping.parse``
turns such fields into proper values, so the event carries ``"2024-02-29"`` and ``"1234.56"``::

    mapping:
      parse:
        posting_date: {type: date, format: "%Y%m%d", nulls: ["00000000", "99999999"]}
        booked_at:    {type: datetime, format: "%Y%m%d%H%M%S", timezone: Europe/Berlin}
        amount:       {type: decimal, scale: 2}            # "000123456" -> "1234.56"
        rate:         {type: decimal, decimal_separator: ","}
        active:       {type: bool, true: ["Y", "J"], false: ["N", " "]}
        branch:       {type: int}
        name:         {type: string, strip: true}

A value that does not fit its rule is a :class:`~gateway.errors.ContractError` naming the field,
the rule and (shortened) the value: the record goes to dead letters, the rest of the batch flows.
Values that are already of the target type (a driver returned a ``date``) pass unchanged.
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import date, datetime
from decimal import Decimal, InvalidOperation
from typing import Annotated, Any, Literal
from zoneinfo import ZoneInfo

from pydantic import BaseModel, ConfigDict, Field, field_validator

from gateway.errors import ContractError
from gateway.events.timeutil import check_zone, to_utc

__all__ = ["ParseRule", "apply_rules"]


class _Rule(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    nulls: list[str] = Field(
        default_factory=list,
        description="Texts meaning 'no value' (e.g. '', '00000000'), compared after trimming spaces; become null.",
    )

    def _text(self, value: Any) -> str | None:
        """The value as trimmed text, or None for a null or a configured null text."""
        if value is None:
            return None
        text = value.decode("latin-1") if isinstance(value, (bytes, bytearray)) else str(value)
        text = text.strip()
        return None if text in self.nulls else text


class DateRule(_Rule):
    """Text to an ISO-8601 date."""

    type: Literal["date"]
    format: str = Field("%Y%m%d", description="strptime format of the text, e.g. %Y%m%d or %d.%m.%Y.")

    def apply(self, value: Any) -> Any:
        if isinstance(value, date) and not isinstance(value, datetime):
            return value
        text = self._text(value)
        return None if text is None else datetime.strptime(text, self.format).date()


class DateTimeRule(_Rule):
    """Text to a UTC timestamp (read in ``timezone``)."""

    type: Literal["datetime"]
    format: str = Field("%Y%m%d%H%M%S", description="strptime format of the text.")
    timezone: str = Field("UTC", description="IANA zone the text is written in (when it has no offset).")

    @field_validator("timezone")
    @classmethod
    def _zone(cls, v: str) -> str:
        return check_zone(v)

    def apply(self, value: Any) -> Any:
        if isinstance(value, datetime):
            parsed = value
        else:
            text = self._text(value)
            if text is None:
                return None
            parsed = datetime.strptime(text, self.format)
        if parsed.tzinfo is None:
            parsed = parsed.replace(tzinfo=ZoneInfo(self.timezone))
        return to_utc(parsed)


class DecimalRule(_Rule):
    """Text (or a number) to an exact decimal."""

    type: Literal["decimal"]
    scale: int = Field(0, ge=0, le=38, description="Implied decimal places: with 2, '000123456' is 1234.56.")
    decimal_separator: Literal[".", ","] = Field(".", description="Decimal separator of the text.")
    thousands_separator: Literal["", ".", ",", " ", "'"] = Field("", description="Grouping character to drop.")

    def apply(self, value: Any) -> Any:
        if isinstance(value, (int, Decimal)) and not isinstance(value, bool):
            number = Decimal(value)
        else:
            text = self._text(value)
            if text is None:
                return None
            if self.thousands_separator:
                text = text.replace(self.thousands_separator, "")
            if self.decimal_separator == ",":
                text = text.replace(",", ".")
            number = Decimal(text)
            if not number.is_finite():
                raise InvalidOperation(text)
        return number.scaleb(-self.scale) if self.scale else number


class IntRule(_Rule):
    """Text to an integer (leading zeros and signs allowed)."""

    type: Literal["int"]

    def apply(self, value: Any) -> Any:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        text = self._text(value)
        return None if text is None else int(text, 10)


class BoolRule(_Rule):
    """Flag text to a boolean."""

    type: Literal["bool"]
    true: list[str] = Field(default_factory=lambda: ["Y", "1", "J", "T"], description="Texts meaning true.")
    false: list[str] = Field(default_factory=lambda: ["N", "0", "F"], description="Texts meaning false.")

    def apply(self, value: Any) -> Any:
        if isinstance(value, bool):
            return value
        text = self._text(value)
        if text is None:
            return None
        if text in self.true:
            return True
        if text in self.false:
            return False
        raise ValueError(f"expected one of {self.true} (true) or {self.false} (false)")


class StringRule(_Rule):
    """Text, trimmed (CHAR padding, space-filled COBOL fields)."""

    type: Literal["string"]
    strip: bool = Field(True, description="Trim leading and trailing spaces.")

    def apply(self, value: Any) -> Any:
        if value is None:
            return None
        text = value.decode("latin-1") if isinstance(value, (bytes, bytearray)) else str(value)
        text = text.strip() if self.strip else text
        return None if text in self.nulls else text


#: One parse rule; ``type`` selects it.
ParseRule = Annotated[
    DateRule | DateTimeRule | DecimalRule | IntRule | BoolRule | StringRule,
    Field(discriminator="type"),
]


def apply_rules(data: Mapping[str, Any], rules: Mapping[str, Any], source_name: str) -> dict[str, Any]:
    """``data`` with each ruled field parsed (a new dict; fields without a rule are kept).

    Raises:
        ContractError: a value does not fit its rule (field, rule and a shortened value named).
    """
    out = dict(data)
    for name, rule in rules.items():
        if name not in out:
            continue  # a missing field is the mapper's business (it names the fields it needs)
        value = out[name]
        try:
            out[name] = rule.apply(value)
        except (ValueError, InvalidOperation, TypeError) as exc:
            shown = repr(value)
            shown = shown if len(shown) <= 40 else shown[:40] + "..."
            detail = f" ({exc})" if isinstance(exc, ValueError) and "expected one of" in str(exc) else ""
            raise ContractError(
                f"source {source_name!r}: field {name!r}: {shown} does not parse as {rule.type}"
                f"{_describe(rule)}{detail}"
            ) from None
    return out


def _describe(rule: Any) -> str:
    fmt = getattr(rule, "format", None)
    return f" with format {fmt!r}" if fmt else ""
