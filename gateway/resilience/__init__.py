"""Retry policies (tenacity) and, later, circuit breakers; see docs/decisions."""

from gateway.resilience.retry import RetryPolicy, retrying

__all__ = ["RetryPolicy", "retrying"]
