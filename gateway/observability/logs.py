"""Log formats: one JSON object per line, or text; both carry the correlation id and redact secrets.

:func:`configure_logging` is what ``gateway`` commands call (``--log-format``). The JSON formatter
is the stdlib :class:`logging.Formatter` with orjson (already a dependency; no extra package):

    {"time": "2026-01-02T03:04:05.678Z", "level": "INFO", "logger": "gateway.relay",
     "message": "...", "correlation_id": "4bf92f35...", "thread": "gateway-relay", ...extra}

Anything passed as ``extra={...}`` to a log call becomes a field. Secrets are removed from the
message, the extra fields and tracebacks: the values of every ``SecretStr`` in the settings
(:func:`secrets_of`), ``user:password@`` in URLs, bearer tokens, ``gw_`` API keys and
``password=...``-style pairs.
"""

from __future__ import annotations

import logging
import re
import sys
from collections.abc import Iterable
from datetime import UTC, datetime
from typing import Any, Literal

import orjson
from pydantic import BaseModel, SecretStr

from gateway.observability.context import correlation_id

__all__ = ["JsonFormatter", "Redactor", "TextFormatter", "add_secrets", "configure_logging", "resolve_format", "secrets_of"]

LogFormat = Literal["auto", "json", "text"]

_PATTERNS = (
    (re.compile(r"(?P<keep>[A-Za-z][A-Za-z0-9+.\-]*://[^:/@\s]*:)[^@\s/]+(?=@)"), r"\g<keep>***"),
    (re.compile(r"(?P<keep>\bBearer\s+)[A-Za-z0-9._~+/=\-]+", re.IGNORECASE), r"\g<keep>***"),
    (re.compile(r"\bgw_[A-Za-z0-9_\-]{8,}"), "gw_***"),
    (re.compile(r"(?P<keep>\b(?:password|passwd|pwd|secret|token|api_key|apikey|key_secret)\s*[=:]\s*)"
                r"(?!\*\*\*)[^\s&,;'\"}]+", re.IGNORECASE), r"\g<keep>***"),
)

#: LogRecord attributes that are not user ``extra`` fields.
_STANDARD = frozenset(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {"message", "asctime", "taskName"}


class Redactor:
    """Removes known secret values and secret-looking patterns from text.

    Args:
        secrets: exact values to hide (each at least 4 characters; shorter ones would shred text).
    """

    def __init__(self, secrets: Iterable[str] = ()) -> None:
        self.values = frozenset(s for s in secrets if s and len(s) >= 4)
        values = sorted(self.values, key=len, reverse=True)
        self._exact = re.compile("|".join(re.escape(v) for v in values)) if values else None

    def __call__(self, text: str) -> str:
        """``text`` without secrets."""
        if self._exact is not None:
            text = self._exact.sub("***", text)
        for pattern, repl in _PATTERNS:
            text = pattern.sub(repl, text)
        return text

    def scrub(self, value: Any) -> Any:
        """``value`` with every string in it (nested dicts, lists, tuples) redacted."""
        if isinstance(value, str):
            return self(value)
        if isinstance(value, dict):
            return {k: self.scrub(v) for k, v in value.items()}
        if isinstance(value, (list, tuple)):
            return [self.scrub(v) for v in value]
        if isinstance(value, (int, float, bool)) or value is None:
            return value
        return self(str(value))


def secrets_of(model: Any) -> set[str]:
    """Every ``SecretStr`` value in a pydantic model (nested models, lists and dicts included),
    and the password inside secret URLs, for :class:`Redactor`."""
    from urllib.parse import unquote, urlsplit

    found: set[str] = set()

    def walk(value: Any) -> None:
        if isinstance(value, SecretStr):
            raw = value.get_secret_value()
            found.add(raw)
            try:
                password = urlsplit(raw).password
            except ValueError:
                password = None
            if password:
                found.update({password, unquote(password)})
        elif isinstance(value, BaseModel):
            for name in type(value).model_fields:
                walk(getattr(value, name, None))
        elif isinstance(value, dict):
            for v in value.values():
                walk(v)
        elif isinstance(value, (list, tuple)):
            for v in value:
                walk(v)

    walk(model)
    return found


class _Base(logging.Formatter):
    def __init__(self, redactor: Redactor | None = None, fmt: str | None = None) -> None:
        super().__init__(fmt)
        self.redact = redactor or Redactor()


class JsonFormatter(_Base):
    """One JSON object per line: time, level, logger, message, correlation_id, thread, extra fields."""

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds")
            .replace("+00:00", "Z"),
            "level": record.levelname,
            "logger": record.name,
            "message": self.redact(record.getMessage()),
        }
        cid = correlation_id()
        if cid is not None:
            out["correlation_id"] = cid
        out["thread"] = record.threadName
        for key, value in record.__dict__.items():
            if key not in _STANDARD and not key.startswith("_") and key not in out:
                out[key] = self.redact.scrub(value)
        if record.exc_info:
            out["exc_info"] = self.redact(self.formatException(record.exc_info))
        if record.stack_info:
            out["stack_info"] = self.redact(self.formatStack(record.stack_info))
        return orjson.dumps(out).decode()


class TextFormatter(_Base):
    """``time LEVEL logger [correlation id]: message`` -- the classic format, redacted."""

    def __init__(self, redactor: Redactor | None = None) -> None:
        super().__init__(redactor, "%(asctime)s %(levelname)s %(name)s%(cid)s: %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        cid = correlation_id()
        record.cid = f" [{cid}]" if cid else ""
        try:
            return self.redact(super().format(record))
        finally:
            del record.cid


def resolve_format(fmt: str, stream: Any = None) -> Literal["json", "text"]:
    """``auto`` is ``text`` on a terminal and ``json`` otherwise (containers, files, pipes)."""
    if fmt in ("json", "text"):
        return fmt  # type: ignore[return-value]
    if fmt != "auto":
        raise ValueError(f"log format: expected auto, json or text; got {fmt!r}")
    stream = stream if stream is not None else sys.stderr
    isatty = getattr(stream, "isatty", None)
    return "text" if isatty is not None and isatty() else "json"


def configure_logging(
    level: str = "info", fmt: str = "auto", *, secrets: Iterable[str] = (), stream: Any = None, force: bool = False
) -> logging.Handler | None:
    """Install one root stream handler in ``fmt`` -- like :func:`logging.basicConfig`, a no-op when
    someone else (an embedding application, pytest) configured the root logger already.

    Args:
        level: root level name (``debug``, ``info``...).
        fmt: ``json``, ``text`` or ``auto`` (:func:`resolve_format`).
        secrets: exact values never to print (see :func:`secrets_of`; :func:`add_secrets` adds more later).
        stream: where to write (default ``sys.stderr``).
        force: remove every root handler first (``basicConfig(force=True)``).

    Returns:
        The installed handler, or ``None`` when logging was configured by someone else.
    """
    root = logging.getLogger()
    ours = [h for h in root.handlers if getattr(h, "_gateway_handler", False)]
    if not force and len(ours) < len(root.handlers):
        return None
    for old in list(root.handlers) if force else ours:
        root.removeHandler(old)
    stream = stream if stream is not None else sys.stderr
    redactor = Redactor(secrets)
    handler = logging.StreamHandler(stream)
    handler._gateway_handler = True  # type: ignore[attr-defined]
    handler.setFormatter(JsonFormatter(redactor) if resolve_format(fmt, stream) == "json" else TextFormatter(redactor))
    root.addHandler(handler)
    root.setLevel(getattr(logging, level.upper(), logging.INFO))
    logging.getLogger("pika").setLevel(logging.WARNING)
    return handler


def add_secrets(secrets: Iterable[str]) -> None:
    """Add ``secrets`` to the redactor of every root handler formatted by this module (after settings load)."""
    extra = set(secrets)
    for handler in logging.getLogger().handlers:
        fmt = handler.formatter
        if isinstance(fmt, _Base) and not extra <= fmt.redact.values:
            fmt.redact = Redactor(fmt.redact.values | extra)
