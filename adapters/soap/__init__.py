"""The SOAP polling adapter (zeep): paged calls with a resumable cursor, hardened XML, mandatory timeouts."""

from adapters.soap.source import (
    GuardedTransport,
    SoapConfig,
    SoapFaultError,
    SoapSource,
    to_plain,
)

__all__ = ["GuardedTransport", "SoapConfig", "SoapFaultError", "SoapSource", "to_plain"]
