"""The gateway's public exceptions.

Every exception says what the caller should do about it:

* :class:`TransientError` -- retry with backoff (connection loss, timeouts, 5xx).
* :class:`PermanentError` -- dead-letter or fail; retrying cannot help.
* :class:`SkippableError` -- log, acknowledge and continue.
* :class:`ConfigurationError` -- fail fast at start-up with a message naming what is wrong.

Adapters translate native errors (DBAPI, pika, zeep, httpx) into these in exactly one
``classify_error`` each.
"""

from __future__ import annotations

__all__ = [
    "GatewayError",
    "TransientError",
    "PermanentError",
    "SkippableError",
    "ConfigurationError",
    "ContractError",
    "BackpressureError",
    "CircuitOpenError",
    "StoreUnavailableError",
    "FencingError",
    "NotConnectedError",
]


class GatewayError(Exception):
    """Root of every error the gateway raises on purpose."""


class TransientError(GatewayError):
    """A failure that may succeed when retried later (network, timeouts, overload)."""


class PermanentError(GatewayError):
    """A failure that will repeat on every attempt; the item goes to dead letters."""


class SkippableError(GatewayError):
    """An item that can be logged and acknowledged without further action."""


class ConfigurationError(GatewayError):
    """Invalid configuration; raised at start-up, never mid-stream."""


class ContractError(PermanentError):
    """A record or event does not match the contract it must follow (bad input)."""


class BackpressureError(TransientError):
    """The gateway refuses new work for now (outbox backlog or broker refusing); retry later."""

    def __init__(self, message: str, retry_after: float = 1.0) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class CircuitOpenError(TransientError):
    """A circuit breaker refused the call without making it; the downstream is presumed down.

    It is transient for the *caller's caller* (an HTTP client may come back after
    :attr:`retry_after`), but must never be retried in-process: retry policies exclude it
    explicitly, and breakers ignore it (it counts neither as failure nor as success).

    Attributes:
        breaker_name: name of the breaker that refused the call.
        retry_after: seconds until the breaker lets trial calls through again (an estimate
            when it is already half-open and its trial permits are taken).
    """

    def __init__(self, breaker_name: str, retry_after: float) -> None:
        # args stay (breaker_name, retry_after) so the exception pickles and copies intact.
        super().__init__(breaker_name, retry_after)
        self.breaker_name = breaker_name
        self.retry_after = retry_after

    def __str__(self) -> str:
        return f"circuit {self.breaker_name!r} is open; retry after {self.retry_after:.1f} s"


class StoreUnavailableError(TransientError):
    """The gateway's SQL store could not be reached or the transaction failed to commit."""


class FencingError(PermanentError):
    """A cursor write was refused because this runner's lease epoch is stale."""


class NotConnectedError(GatewayError):
    """A collaborator was used before ``connect()``/``start()``."""
