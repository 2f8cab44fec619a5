"""The rules scorer (kind ``rules``): deterministic, explainable scores from ordered rules.

Made to be a fallback while the primary model's breaker is open, and useful on its own for
thresholds. Options::

    rules:                       # evaluated in order; the FIRST rule whose condition holds wins
      - when: data.amount > 5000 and data.customer.country not in ["DE", "AT"]
        score: 0.95
        reason: large foreign payment
    default: 0.0                 # the score when no rule matches

Conditions use a small expression language, parsed at configuration time by a hand-written
tokenizer and recursive-descent parser (never ``eval``)::

    expr       := and_expr ("or" and_expr)*
    and_expr   := not_expr ("and" not_expr)*
    not_expr   := "not" not_expr | primary
    primary    := "(" expr ")" | "true" | "false" | predicate
    predicate  := operand (CMP operand | "in" list | "not" "in" list | "exists")
    CMP        := ">" | ">=" | "<" | "<=" | "==" | "!="
    operand    := field | NUMBER | STRING | "true" | "false"
    list       := "[" [literal ("," literal)* [","]] "]"
    field      := "data" ("." NAME | "." DIGITS)* | "extensions." NAME
                | "type" | "source" | "subject" | "id" | "time"

Semantics (documented in docs/scoring.md): a comparison with a missing (or null) field is false;
so is one between mismatched types (a string that is not a decimal number against a number, a
boolean against anything but a boolean, ordering of booleans). When one side is a number, a
decimal string on the other side (``"12.50"``) is compared as that number, exactly (Decimal).
Two strings compare as strings. ``x not in [...]`` is true when ``x`` exists and equals none of
the values, and ``x != v`` when both are comparable and differ: both are false for a missing field,
while ``not (x == v)`` is true for it.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from decimal import Decimal
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_validator

from gateway.config import ScoringSettings
from gateway.events import Event, format_time
from gateway.scoring.protocols import ScoreResult
from gateway.scoring.registry import parse_options

__all__ = ["Condition", "RuleSyntaxError", "RulesOptions", "RulesScorer", "compile_condition", "create"]

_ENGINE_VERSION = 1  # bump when the meaning of an unchanged rule set changes
_MAX_LENGTH = 4000
_MAX_DEPTH = 32
_KEYWORDS = frozenset({"and", "or", "not", "in", "exists", "true", "false"})
_SCALAR_ROOTS = frozenset({"type", "source", "subject", "id", "time"})
_TOKEN = re.compile(
    r"""(?P<ws>\s+)
      | (?P<number>-?(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)(?:[eE][+-]?[0-9]{1,4})?(?![\w.]))
      | (?P<string>"(?:[^"\\]|\\.)*"|'(?:[^'\\]|\\.)*')
      | (?P<op>>=|<=|==|!=|>|<)
      | (?P<punct>[()\[\],])
      | (?P<word>[^\W\d][\w-]*(?:\.(?:[^\W\d][\w-]*|[0-9]+))*)
    """,
    re.VERBOSE,
)
_DECIMAL = re.compile(r"[+-]?(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)(?:[eE][+-]?[0-9]{1,4})?")
_HINTS = {"=": "use == to compare", "&": "use and", "|": "use or", "!": "use not or !="}


class _Missing:
    """A field the event does not have."""

    def __repr__(self) -> str:
        return "<missing>"


MISSING = _Missing()


class RuleSyntaxError(ValueError):
    """An invalid condition; ``column`` is 1-based."""

    def __init__(self, message: str, column: int, expression: str) -> None:
        super().__init__(f"column {column} of {expression!r}: {message}")
        self.column = column
        self.expression = expression


# --- the syntax tree ---------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Field:
    parts: tuple[str, ...]

    def value(self, event: Event) -> Any:
        root, rest = self.parts[0], self.parts[1:]
        if root == "time":
            return format_time(event.time)
        if root == "extensions":
            got: Any = event.extensions.get(rest[0], MISSING) if isinstance(event.extensions, Mapping) else MISSING
            rest = rest[1:]
        elif root == "data":
            got = event.data
        else:
            got = getattr(event, root, MISSING)
        for seg in rest:
            if isinstance(got, Mapping):
                got = got.get(seg, MISSING)
            elif isinstance(got, list) and seg.isascii() and seg.isdigit() and int(seg) < len(got):
                got = got[int(seg)]
            else:
                return MISSING
        return MISSING if got is None else got

    def __str__(self) -> str:
        return ".".join(self.parts)


@dataclass(frozen=True, slots=True)
class _Literal:
    value: Decimal | str | bool

    def __str__(self) -> str:
        if isinstance(self.value, bool):
            return "true" if self.value else "false"
        return json.dumps(self.value) if isinstance(self.value, str) else str(self.value)


_Operand = _Field | _Literal


def _operand_value(operand: _Operand, event: Event) -> Any:
    return operand.value(event) if isinstance(operand, _Field) else operand.value


def _number(value: Any) -> Decimal | None:
    """``value`` as an exact number, or None when it is not one (bools are not numbers)."""
    try:
        if isinstance(value, bool):
            return None
        if isinstance(value, Decimal):
            return value if value.is_finite() else None
        if isinstance(value, int):
            return Decimal(value)
        if isinstance(value, float):
            return Decimal(repr(value)) if math.isfinite(value) else None
        if isinstance(value, str) and len(value) <= 64 and _DECIMAL.fullmatch(value.strip()):
            return Decimal(value.strip())
    except (ArithmeticError, ValueError):  # absurd ints or exponents: not comparable
        return None
    return None


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float | Decimal) and not isinstance(value, bool)


def _compare(op: str, left: Any, right: Any) -> bool:
    """``left op right`` under the rules' semantics; missing or mismatched operands give False."""
    if left is MISSING or right is MISSING:
        return False
    a: Any
    b: Any
    if _is_number(left) or _is_number(right):
        a, b = _number(left), _number(right)
        if a is None or b is None:
            return False
    elif isinstance(left, str) and isinstance(right, str):
        a, b = left, right
    elif isinstance(left, bool) and isinstance(right, bool):
        if op not in ("==", "!="):
            return False
        a, b = left, right
    else:
        return False
    if op == "==":
        return bool(a == b)
    if op == "!=":
        return bool(a != b)
    if op == ">":
        return bool(a > b)
    if op == ">=":
        return bool(a >= b)
    if op == "<":
        return bool(a < b)
    return bool(a <= b)


@dataclass(frozen=True, slots=True)
class _Compare:
    op: str
    left: _Operand
    right: _Operand

    def holds(self, event: Event) -> bool:
        return _compare(self.op, _operand_value(self.left, event), _operand_value(self.right, event))

    def __str__(self) -> str:
        return f"{self.left} {self.op} {self.right}"


@dataclass(frozen=True, slots=True)
class _In:
    item: _Operand
    values: tuple[_Literal, ...]
    negated: bool

    def holds(self, event: Event) -> bool:
        value = _operand_value(self.item, event)
        if value is MISSING:
            return False
        found = any(_compare("==", value, lit.value) for lit in self.values)
        return found != self.negated

    def __str__(self) -> str:
        return f"{self.item} {'not in' if self.negated else 'in'} [{', '.join(map(str, self.values))}]"


@dataclass(frozen=True, slots=True)
class _Exists:
    field: _Field

    def holds(self, event: Event) -> bool:
        return self.field.value(event) is not MISSING

    def __str__(self) -> str:
        return f"{self.field} exists"


@dataclass(frozen=True, slots=True)
class _Const:
    value: bool

    def holds(self, event: Event) -> bool:
        return self.value

    def __str__(self) -> str:
        return "true" if self.value else "false"


@dataclass(frozen=True, slots=True)
class _Not:
    inner: _Node

    def holds(self, event: Event) -> bool:
        return not self.inner.holds(event)

    def __str__(self) -> str:
        return f"not ({self.inner})"


@dataclass(frozen=True, slots=True)
class _BoolOp:
    op: str  # "and" | "or"
    items: tuple[_Node, ...]

    def holds(self, event: Event) -> bool:
        if self.op == "and":
            return all(item.holds(event) for item in self.items)
        return any(item.holds(event) for item in self.items)

    def __str__(self) -> str:
        return "(" + f" {self.op} ".join(map(str, self.items)) + ")"


_Node = _Compare | _In | _Exists | _Const | _Not | _BoolOp


def _fields(node: _Node) -> Iterator[_Field]:
    if isinstance(node, _Compare):
        yield from (x for x in (node.left, node.right) if isinstance(x, _Field))
    elif isinstance(node, _In) and isinstance(node.item, _Field):
        yield node.item
    elif isinstance(node, _Exists):
        yield node.field
    elif isinstance(node, _Not):
        yield from _fields(node.inner)
    elif isinstance(node, _BoolOp):
        for item in node.items:
            yield from _fields(item)


@dataclass(frozen=True, slots=True)
class Condition:
    """A compiled rule condition.

    Attributes:
        text: the expression as written.
        canonical: a normalised rendering (fully parenthesised); the rules' version hashes it.
        fields: the field paths the condition reads, in order of appearance.
    """

    text: str
    root: _Node
    fields: tuple[str, ...]

    @property
    def canonical(self) -> str:
        """The fully parenthesised form of the condition."""
        return str(self.root)

    def matches(self, event: Event) -> bool:
        """Whether the condition holds for ``event``; never raises on any event content."""
        return self.root.holds(event)

    def matched_values(self, event: Event) -> dict[str, Any]:
        """The values (JSON-safe, shortened) of the fields the condition reads that ``event`` has."""
        out: dict[str, Any] = {}
        for path in self.fields:
            value = _Field(tuple(path.split("."))).value(event)
            if value is not MISSING:
                out[path] = _shown(value)
        return out


def _shown(value: Any) -> Any:
    if isinstance(value, bool) or value is None or isinstance(value, int):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else str(value)
    if isinstance(value, Mapping):
        return f"<object with {len(value)} keys>"
    if isinstance(value, list | tuple):
        return f"<array of {len(value)} items>"
    text = value if isinstance(value, str) else str(value)
    return text if len(text) <= 200 else text[:199] + "\u2026"


# --- tokenizer and parser ----------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Token:
    kind: str  # number | string | op | punct | kw | field | end
    text: str
    column: int


def _unquote(text: str) -> str:
    out, chars = [], iter(text[1:-1])
    for ch in chars:
        if ch == "\\":
            nxt = next(chars)
            out.append({"n": "\n", "t": "\t"}.get(nxt, nxt))
        else:
            out.append(ch)
    return "".join(out)


def _tokens(text: str) -> list[_Token]:
    out: list[_Token] = []
    pos = 0
    while pos < len(text):
        m = _TOKEN.match(text, pos)
        if m is None:
            ch = text[pos]
            if ch in "\"'":
                raise RuleSyntaxError("unterminated string", pos + 1, text)
            hint = _HINTS.get(ch)
            raise RuleSyntaxError(f"unexpected character {ch!r}" + (f" ({hint})" if hint else ""), pos + 1, text)
        kind = m.lastgroup or ""
        if kind != "ws":
            word = m.group()
            if kind == "word":
                kind = "kw" if word in _KEYWORDS else "field"
            out.append(_Token(kind, word, pos + 1))
        pos = m.end()
    out.append(_Token("end", "", len(text) + 1))
    return out


class _Parser:
    """Recursive descent over the token list; one instance per expression."""

    def __init__(self, text: str) -> None:
        self.text = text
        self.toks = _tokens(text)
        self.i = 0
        self.depth = 0

    def error(self, message: str, tok: _Token | None = None) -> RuleSyntaxError:
        return RuleSyntaxError(message, (tok or self.peek()).column, self.text)

    def peek(self, ahead: int = 0) -> _Token:
        return self.toks[min(self.i + ahead, len(self.toks) - 1)]

    def take(self) -> _Token:
        tok = self.peek()
        self.i += 1
        return tok

    def at(self, kind: str, text: str | None = None, ahead: int = 0) -> bool:
        tok = self.peek(ahead)
        return tok.kind == kind and (text is None or tok.text == text)

    def parse(self) -> _Node:
        if self.at("end"):
            raise self.error("empty condition (write true to match every event)")
        node = self.expr()
        if not self.at("end"):
            raise self.error(f"unexpected {self.describe(self.peek())} (expected and, or or the end)")
        return node

    def describe(self, tok: _Token) -> str:
        return "end of the condition" if tok.kind == "end" else repr(tok.text)

    def nest(self) -> None:
        self.depth += 1
        if self.depth > _MAX_DEPTH:
            raise self.error(f"nested deeper than {_MAX_DEPTH} levels")

    def expr(self) -> _Node:
        return self.chain("or", self.and_expr)

    def and_expr(self) -> _Node:
        return self.chain("and", self.not_expr)

    def chain(self, op: str, sub: Any) -> _Node:
        items = [sub()]
        while self.at("kw", op):
            self.take()
            items.append(sub())
        return items[0] if len(items) == 1 else _BoolOp(op, tuple(items))

    def not_expr(self) -> _Node:
        if self.at("kw", "not"):
            self.nest()
            self.take()
            inner = self.not_expr()
            self.depth -= 1
            return _Not(inner)
        return self.primary()

    def primary(self) -> _Node:
        if self.at("punct", "("):
            self.nest()
            self.take()
            node = self.expr()
            self.depth -= 1
            if not self.at("punct", ")"):
                raise self.error(f"expected ')' but found {self.describe(self.peek())}")
            self.take()
            return node
        if self.peek().kind == "kw" and self.peek().text in ("true", "false") and not self.operator_follows(1):
            return _Const(self.take().text == "true")
        start = self.peek()
        left = self.operand()
        tok = self.peek()
        if tok.kind == "op":
            self.take()
            return _Compare(tok.text, left, self.operand())
        if self.at("kw", "in") or (self.at("kw", "not") and self.at("kw", "in", 1)):
            negated = self.take().text == "not"
            if negated:
                self.take()
            return _In(left, self.literal_list(), negated)
        if self.at("kw", "exists"):
            if not isinstance(left, _Field):
                raise self.error("exists needs a field, not a value", start)
            self.take()
            return _Exists(left)
        raise self.error(
            f"expected an operator (> >= < <= == != in, not in, exists) after {start.text!r}, "
            f"found {self.describe(tok)}"
        )

    def operator_follows(self, ahead: int) -> bool:
        tok = self.peek(ahead)
        return tok.kind == "op" or (tok.kind == "kw" and tok.text in ("in", "exists")) or (
            tok.kind == "kw" and tok.text == "not" and self.at("kw", "in", ahead + 1)
        )

    def operand(self) -> _Operand:
        tok = self.peek()
        if tok.kind == "field":
            self.take()
            return self.field(tok)
        if tok.kind in ("number", "string") or (tok.kind == "kw" and tok.text in ("true", "false")):
            return self.literal()
        if tok.kind == "punct" and tok.text == "[":
            raise self.error("a list is only allowed after in / not in")
        raise self.error(f"expected a field, number, string or boolean, found {self.describe(tok)}")

    def literal(self) -> _Literal:
        tok = self.take()
        if tok.kind == "number":
            return _Literal(Decimal(tok.text))
        if tok.kind == "string":
            return _Literal(_unquote(tok.text))
        if tok.kind == "kw" and tok.text in ("true", "false"):
            return _Literal(tok.text == "true")
        raise self.error(f"expected a number, string or boolean, found {self.describe(tok)}", tok)

    def literal_list(self) -> tuple[_Literal, ...]:
        if not self.at("punct", "["):
            raise self.error(f"expected '[' after in, found {self.describe(self.peek())}")
        self.take()
        items: list[_Literal] = []
        while not self.at("punct", "]"):
            items.append(self.literal())
            if self.at("punct", ","):
                self.take()
            elif not self.at("punct", "]"):
                raise self.error(f"expected ',' or ']' in the list, found {self.describe(self.peek())}")
        self.take()
        return tuple(items)

    def field(self, tok: _Token) -> _Field:
        parts = tuple(tok.text.split("."))
        root = parts[0]
        if root in _SCALAR_ROOTS and len(parts) > 1:
            raise self.error(f"{root} has no sub-fields (only data. and extensions. do)", tok)
        if root == "extensions" and len(parts) != 2:
            raise self.error("write extensions.<name>", tok)
        if root not in _SCALAR_ROOTS and root not in ("data", "extensions"):
            raise self.error(
                f"unknown field {tok.text!r}: fields start with data. or extensions., or are type, source, "
                "subject, id or time",
                tok,
            )
        return _Field(parts)


def compile_condition(text: str) -> Condition:
    """Parse a rule condition.

    Args:
        text: the expression, e.g. ``data.amount >= 1000 and type == "com.acme.payment"``.

    Returns:
        The compiled :class:`Condition`.

    Raises:
        RuleSyntaxError: the expression is invalid; the message has the 1-based column and the
            expression.
    """
    if len(text) > _MAX_LENGTH:
        raise RuleSyntaxError(f"longer than {_MAX_LENGTH} characters", _MAX_LENGTH + 1, text[:40] + "...")
    root = _Parser(text).parse()
    fields = tuple(dict.fromkeys(str(f) for f in _fields(root)))
    return Condition(text, root, fields)


# --- options, scorer and factory ---------------------------------------------------------------


class RuleOptions(BaseModel):
    """One rule: a condition, the score it gives and why."""

    model_config = ConfigDict(extra="forbid")

    when: str = Field(description="The condition (see the module docstring for the grammar).")
    score: float = Field(ge=0, le=1, allow_inf_nan=False, description="Score when the condition holds.")
    reason: str = Field(min_length=1, max_length=500, description="Why; carried in the explanation.")

    @field_validator("when")
    @classmethod
    def _parses(cls, value: str) -> str:
        compile_condition(value)  # RuleSyntaxError is a ValueError: pydantic reports it with the path
        return value


class RulesOptions(BaseModel):
    """Options of the ``rules`` scorer kind."""

    model_config = ConfigDict(extra="forbid")

    rules: list[RuleOptions] = Field(min_length=1, description="Rules in order; the first match wins.")
    default: float = Field(0.0, ge=0, le=1, allow_inf_nan=False, description="Score when no rule matches.")


@dataclass(frozen=True, slots=True)
class _Rule:
    condition: Condition
    score: float
    reason: str


class RulesScorer:
    """Scores each event with the first rule whose condition holds, else ``default``.

    Stateless and deterministic: the same event and rules always give the same score. The
    version is a hash of the (normalised) rules and the default, so editing the rules gives new
    scores a new version while scores stay idempotent per version.

    Args:
        name: the model's configured name.
        rules: ``(condition, score, reason)`` triples, in order.
        default: score when no rule matches.
    """

    def __init__(self, name: str, rules: Sequence[tuple[Condition, float, str]], default: float = 0.0) -> None:
        self.name = name
        self.rules = tuple(_Rule(c, float(s), r) for c, s, r in rules)
        self.default = float(default)
        canon = {
            "engine": _ENGINE_VERSION,
            "default": repr(self.default),
            "rules": [[r.condition.canonical, repr(r.score), r.reason] for r in self.rules],
        }
        digest = hashlib.sha256(json.dumps(canon, sort_keys=True).encode()).hexdigest()
        self.version = f"rules-{digest[:12]}"

    def score_one(self, event: Event) -> ScoreResult:
        """The score of one event, explained as ``{"rule", "reason", "matched"}``."""
        for index, rule in enumerate(self.rules):
            if rule.condition.matches(event):
                matched = rule.condition.matched_values(event)
                return ScoreResult(rule.score, {"rule": index, "reason": rule.reason, "matched": matched})
        return ScoreResult(self.default, {"rule": None, "reason": "no rule matched", "matched": {}})

    def score_batch(self, events: Sequence[Event]) -> list[ScoreResult]:
        """One result per event, in order."""
        return [self.score_one(event) for event in events]


def create(name: str, options: dict[str, Any], settings: ScoringSettings) -> RulesScorer:
    """Factory of the ``rules`` kind (entry point ``gateway.scorers:rules``).

    Args:
        name: the model's configured name; becomes the scorer's name.
        options: ``{"rules": [{"when", "score", "reason"}, ...], "default": float}``.
        settings: unused (the rules need no shared settings).

    Returns:
        A :class:`RulesScorer`.

    Raises:
        ConfigurationError: invalid options, e.g. ``scoring.models.<name>.options.rules.0.when:
            column 15: ...`` for a condition that does not parse.
    """
    opts = parse_options(RulesOptions, name, options)
    compiled = [(compile_condition(r.when), r.score, r.reason) for r in opts.rules]
    return RulesScorer(name, compiled, opts.default)
