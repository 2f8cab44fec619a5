"""pika errors in the gateway taxonomy: the one place that classifies them.

Used by every pika client of the gateway (the RabbitMQ bus, the legacy-queue source, the bridge)
through :func:`classify_pika_error`; see the mapping table in ``docs/resilience.md``.

Messages name the exception type and the broker's reply code and text, never the URL (it may
hold a password).
"""

from __future__ import annotations

from pika import exceptions as px

from gateway.errors import (
    BackpressureError,
    ConfigurationError,
    GatewayError,
    PermanentError,
    TransientError,
)

__all__ = ["classify_pika_error"]

#: AMQP reply codes that mean "the broker refuses this setup": fixing the configuration (or the
#: broker's topology and permissions) is the only cure. 403 ACCESS_REFUSED, 404 NOT_FOUND,
#: 406 PRECONDITION_FAILED (a declare with other arguments), 530 NOT_ALLOWED (e.g. no such vhost).
_SETUP_CODES = frozenset({403, 404, 406, 530})


def _reply(exc: BaseException) -> str:
    code, text = getattr(exc, "reply_code", None), getattr(exc, "reply_text", None)
    return f"{type(exc).__name__}" + (f" {code} {text}" if code is not None else "")


def classify_pika_error(exc: BaseException, context: str = "RabbitMQ") -> GatewayError:
    """Translate a pika (or socket) error into the gateway taxonomy.

    * ``ConfigurationError`` (fail fast, never retried): refused credentials or vhost
      (``ProbableAuthenticationError``, ``ProbableAccessDeniedError``, ``AuthenticationError``)
      and a connection or channel closed by the broker with 403, 404, 406 or 530;
    * ``BackpressureError`` (transient): the broker nacked a publish (``NackError``: a full
      queue with ``overflow: reject-publish``) or kept the connection blocked
      (``ConnectionBlockedTimeout``: a memory or disk alarm);
    * ``PermanentError``: a message pika cannot encode (``ProtocolSyntaxError`` and subclasses,
      ``ShortStringTooLong``, ``BodyTooLongError``) -- the same message fails every time;
    * ``TransientError``: everything else from pika (lost streams, heartbeat timeouts,
      connections or channels closed for other reasons, returned unroutable messages -- a
      binding may appear) and ``OSError`` (connection refused, timeouts);
    * gateway errors pass through; anything else is ``PermanentError``.

    Args:
        exc: the error pika (or the socket layer) raised.
        context: what was being talked to, for the message (e.g. ``"source 'queue': legacy broker"``).

    Returns:
        The gateway error, with ``exc`` as its cause.
    """
    if isinstance(exc, GatewayError):
        return exc
    err: GatewayError
    if isinstance(exc, (px.ProbableAuthenticationError, px.ProbableAccessDeniedError, px.AuthenticationError)):
        err = ConfigurationError(f"{context}: the broker refused the credentials or vhost ({type(exc).__name__})")
    elif isinstance(exc, (px.ConnectionClosedByBroker, px.ChannelClosedByBroker)) and exc.reply_code in _SETUP_CODES:
        err = ConfigurationError(f"{context}: the broker refused the request: {_reply(exc)}")
    elif isinstance(exc, px.NackError):
        err = BackpressureError(f"{context}: the broker refused {len(exc.messages)} message(s) (nack): a queue is full")
    elif isinstance(exc, px.ConnectionBlockedTimeout):
        err = BackpressureError(f"{context}: the broker blocked the connection too long (resource alarm)")
    elif isinstance(exc, (px.ProtocolSyntaxError, px.ShortStringTooLong)):
        err = PermanentError(f"{context}: the message cannot be encoded: {type(exc).__name__}: {exc}")
    elif isinstance(exc, px.UnroutableError):
        err = TransientError(f"{context}: {len(exc.messages)} message(s) returned unroutable: no queue is bound")
    elif isinstance(exc, (px.AMQPError, OSError)):
        err = TransientError(f"{context} unavailable: {_reply(exc)}")
    else:
        err = PermanentError(f"{context}: {type(exc).__name__}: {exc}")
    err.__cause__ = exc
    return err
