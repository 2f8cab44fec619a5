"""Schema drift bookkeeping of one source: the baseline fingerprint against the current one.

Pure state, no I/O: the runner feeds it the stored baseline and the adapter's fingerprints, and
persists and logs what it reports.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from adapters.base import Fingerprint
from gateway.events import format_time, utcnow

__all__ = ["DriftTracker", "changed_parts"]


def changed_parts(baseline: Mapping[str, str], current: Mapping[str, str]) -> list[str]:
    """Names of the parts whose digest changed, that were added, or that were removed; sorted."""
    return sorted(name for name in set(baseline) | set(current) if baseline.get(name) != current.get(name))


class DriftTracker:
    """Compares a source's current fingerprint with its baseline.

    Attributes:
        baseline: the stored baseline (digest, parts), or ``None`` before one is stored.
        current: the adapter's latest fingerprint, or ``None`` before the first check.
        drift: ``None``, or ``{"baseline", "current", "current_parts", "changed", "detected_at"}``
            while the current digest differs from the baseline.
    """

    def __init__(self) -> None:
        self.baseline: tuple[str, dict[str, str]] | None = None
        self.current: Fingerprint | None = None
        self.drift: dict[str, Any] | None = None
        self._warned: set[str] = set()  # digests already logged (one warning per new digest)
        self._overridden: set[str] = set()  # digests an operator resumed past without accepting

    def set_baseline(self, digest: str | None, parts: Mapping[str, str] | None) -> None:
        """Take the stored baseline (``None``: none stored yet) and re-evaluate the drift."""
        new = (digest, dict(parts or {})) if digest else None
        if new != self.baseline:
            self.baseline = new
            self._evaluate()

    def observe(self, fp: Fingerprint) -> bool:
        """Record the adapter's current fingerprint.

        Returns:
            ``True`` when it differs from the baseline with a digest not reported before (the
            caller logs one warning for it).
        """
        self.current = fp
        return self._evaluate()

    def blocks(self, stop_on_drift: bool) -> bool:
        """Whether polling must stop: drift, ``stop_on_drift``, and no operator resumed past it."""
        return stop_on_drift and self.drift is not None and self.drift["current"] not in self._overridden

    def override(self) -> None:
        """An operator resumed without accepting: keep polling despite the current digest."""
        if self.drift is not None:
            self._overridden.add(self.drift["current"])

    def _evaluate(self) -> bool:
        if self.baseline is None or self.current is None or self.current.digest == self.baseline[0]:
            self.drift = None
            return False
        base_digest, base_parts = self.baseline
        if self.drift is not None and (self.drift["baseline"], self.drift["current"]) == (base_digest, self.current.digest):
            return False  # known; keep its detection time
        self.drift = {
            "baseline": base_digest,
            "current": self.current.digest,
            "current_parts": dict(self.current.parts),
            "changed": changed_parts(base_parts, self.current.parts),
            "detected_at": format_time(utcnow()),
        }
        new = self.current.digest not in self._warned
        self._warned.add(self.current.digest)
        return new
