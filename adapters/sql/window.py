"""The overlap re-read window: which rows behind the cursor were already emitted.

``overlap_seconds`` makes every poll re-read the rows in ``[cursor.ts - overlap, cursor]``; a row
found there that this process has not emitted is a late commit (its transaction committed after
the cursor passed its timestamp) and is emitted now. :class:`SeenWindow` is the memory of what was
emitted: ``(key, ts)`` pairs, pruned as the window moves and capped at ``limit`` entries (past the
cap the oldest are forgotten: a forgotten row that is read again is re-emitted, and the store drops
it by its event id -- harmless, like the re-reads after a restart, when this memory is empty).

A pair counts as emitted only once its batch is **committed**, which the adapter cannot see
directly: rows of a batch are *pending* until the next ``fetch`` shows the runner moved on from
the cursor that batch returned. If the runner comes back with an older cursor (the outbox commit
failed), the pending rows are dropped and will be emitted again -- a late row is never marked seen
without having been stored.
"""

from __future__ import annotations

import heapq
from datetime import datetime
from typing import Any

__all__ = ["SeenWindow"]

#: Default cap on remembered (key, ts) pairs.
SEEN_LIMIT = 200_000


class SeenWindow:
    """``(key, ts)`` pairs emitted within the overlap window.

    Args:
        limit: the most pairs kept.
    """

    def __init__(self, limit: int = SEEN_LIMIT) -> None:
        self._limit = limit
        self._seen: set[tuple[Any, datetime]] = set()
        self._heap: list[tuple[datetime, int, Any]] = []  # (ts, tiebreak, key): oldest first
        self._n = 0
        self._pending: list[tuple[Any, datetime]] = []
        self._returned: Any = None  # the cursor object the pending batch was returned with
        self._returned_from: Any = None  # the cursor that batch was read from

    def __len__(self) -> int:
        return len(self._seen)

    def __contains__(self, pair: tuple[Any, datetime]) -> bool:
        return pair in self._seen

    def settle(self, cursor: Any) -> None:
        """Confirm or drop the pending pairs, given the cursor the runner polls with now.

        The previous batch was committed if the runner now polls with the cursor object that batch
        returned (or an equal one that differs from the cursor it was read from).
        """
        if self._pending:
            committed = cursor is self._returned or (
                cursor == self._returned and self._returned != self._returned_from
            )
            if committed:
                for key, ts in self._pending:
                    self._add(key, ts)
        self._pending = []
        self._returned = self._returned_from = None

    def hold(self, pairs: list[tuple[Any, datetime]], returned: Any, read_from: Any) -> None:
        """Remember ``pairs`` as pending until :meth:`settle` learns whether they were stored."""
        self._pending = pairs
        self._returned = returned
        self._returned_from = read_from

    def prune(self, before: datetime) -> None:
        """Forget pairs with ``ts < before`` (they left the window)."""
        heap = self._heap
        while heap and heap[0][0] < before:
            ts, _, key = heapq.heappop(heap)
            self._seen.discard((key, ts))

    def _add(self, key: Any, ts: datetime) -> None:
        pair = (key, ts)
        if pair in self._seen:
            return
        self._seen.add(pair)
        self._n += 1
        heapq.heappush(self._heap, (ts, self._n, key))
        while len(self._seen) > self._limit:
            old_ts, _, old_key = heapq.heappop(self._heap)
            self._seen.discard((old_key, old_ts))
