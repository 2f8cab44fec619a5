"""Checkpoints of stateful models in the store, so a scorer restart does not forget what they learned.

A model is **stateful** when it has both ``state_dict()`` (its learned state as JSON-safe data)
and ``load_state_dict(state)`` (restore it; raise ``ValueError`` for a state it cannot take) --
the built-in ``online-anomaly`` model, and any plugin scorer that implements them. The
:class:`ModelCheckpointer` of a scorer process

* **restores** each stateful model at start from the store's best checkpoint of its name and
  version (the one that learned from the most events; see :mod:`gateway.store.checkpoints` for
  why); a checkpoint that does not load is logged as a WARNING and the model starts fresh;
* **saves** one checkpoint per stateful model every ``interval`` seconds from a daemon thread,
  under this process's own instance id, skipping a model whose state did not change since its
  last save; a failed save is logged as a WARNING and retried at the next interval, never raised
  into the scoring workers;
* saves a **final** checkpoint in :meth:`ModelCheckpointer.stop`, so a graceful shutdown loses
  nothing learned. A crash loses at most one interval of learning (never scores: those are
  committed per batch).

``events_seen`` (which ranks the rows) is taken from the state: its top-level ``events_seen``
when it has one (plugin scorers: add it to your state), else the sum of ``seen`` over its
``types`` (the built-in model's layout), else 0.

See docs/scoring.md, "Model state checkpoints".
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import socket
import threading
import time
import uuid
from collections.abc import Callable, Iterable
from datetime import timedelta
from typing import Any, Protocol, runtime_checkable

from gateway.store.checkpoints import ModelCheckpointRepository

__all__ = ["DEFAULT_RETENTION", "ModelCheckpointer", "StatefulScorer", "default_instance", "events_seen_of", "stateful_scorers"]

log = logging.getLogger(__name__)

_INSTANCE_MAX = 128  # model_checkpoints.instance

#: Default age (seconds) after which the checkpoints of gone processes are pruned.
DEFAULT_RETENTION = 7 * 86400.0


@runtime_checkable
class StatefulScorer(Protocol):
    """A scorer whose learned state can be checkpointed (duck-typed: no base class needed).

    ``state_dict`` must be safe to call while another thread runs ``score_batch`` (take the
    model's lock, as the built-in model does), and ``load_state_dict`` must be all-or-nothing.
    """

    name: str
    version: str

    def state_dict(self) -> dict[str, Any]:
        """The learned state as JSON-safe data."""
        ...

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore a state written by :meth:`state_dict`; ``ValueError`` when it does not fit."""
        ...


def default_instance() -> str:
    """This process's checkpoint instance id: ``hostname-pid-<8 hex>`` (unique per start)."""
    ident = f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    return ident[-_INSTANCE_MAX:]


def events_seen_of(state: dict[str, Any]) -> int:
    """Events a state learned from: ``state["events_seen"]``, else the sum of ``seen`` over
    ``state["types"]`` (the built-in model), else 0."""
    seen = state.get("events_seen")
    if isinstance(seen, int) and not isinstance(seen, bool):
        return max(0, seen)
    types = state.get("types")
    if isinstance(types, dict):
        total = 0
        for st in types.values():
            n = st.get("seen") if isinstance(st, dict) else None
            if isinstance(n, int) and not isinstance(n, bool):
                total += max(0, n)
        return total
    return 0


def stateful_scorers(scorers: Iterable[Any]) -> list[StatefulScorer]:
    """The stateful models among ``scorers``, unwrapped from wrappers such as
    :class:`~gateway.scoring.protocols.LockedScorer` (which hold the model in ``inner``).

    ``None`` entries (an unconfigured fallback) are ignored; the same model reached twice counts
    once. Two *different* stateful models with the same name and version would overwrite each
    other's checkpoint: only the first is kept, with a WARNING.
    """
    found: list[StatefulScorer] = []
    seen_ids: set[int] = set()
    keys: set[tuple[str, str]] = set()
    for scorer in scorers:
        model = scorer
        while model is not None and not _is_stateful(model) and getattr(model, "inner", None) is not None:
            model = model.inner
        if model is None or not _is_stateful(model) or id(model) in seen_ids:
            continue
        seen_ids.add(id(model))
        key = (str(model.name), str(model.version))
        if key in keys:
            log.warning("model %r v%r appears twice with separate state; only the first is checkpointed", *key)
            continue
        keys.add(key)
        found.append(model)
    return found


def _is_stateful(obj: Any) -> bool:
    return callable(getattr(obj, "state_dict", None)) and callable(getattr(obj, "load_state_dict", None))


def _digest(state: dict[str, Any]) -> bytes:
    """Fingerprint of a state, to skip saving one that did not change."""
    text = json.dumps(state, sort_keys=True, separators=(",", ":"), allow_nan=True, default=repr)
    return hashlib.blake2b(text.encode("utf-8"), digest_size=16).digest()


class ModelCheckpointer:
    """Restores and periodically checkpoints a scorer process's stateful models.

    Args:
        store: the gateway store (a :class:`~gateway.store.checkpoints.ModelCheckpointRepository`).
        scorers: the process's scorers (primary, fallback, shadow...); only stateful ones are
            checkpointed (see :func:`stateful_scorers`).
        interval: seconds between checkpoints (> 0).
        instance: this process's id in the store (default: :func:`default_instance`).
        retention: seconds; every periodic save also deletes checkpoints older than this (rows of
            processes that are gone), except each model version's best one
            (:meth:`~gateway.store.checkpoints.ModelCheckpointRepository.prune_model_checkpoints`).
            Default 7 days; None keeps every row.
        monotonic: clock of the interval schedule (injectable for tests).
        join_timeout: seconds :meth:`stop` waits for a save in progress before its final save.

    Raises:
        ValueError: ``interval`` or ``retention`` is not > 0.
    """

    def __init__(
        self,
        store: ModelCheckpointRepository,
        scorers: Iterable[Any],
        *,
        interval: float,
        instance: str | None = None,
        retention: float | None = DEFAULT_RETENTION,
        monotonic: Callable[[], float] = time.monotonic,
        join_timeout: float = 30.0,
    ) -> None:
        if not interval > 0:
            raise ValueError(f"checkpoint interval must be > 0 seconds, got {interval!r}")
        if retention is not None and not retention > 0:
            raise ValueError(f"checkpoint retention must be > 0 seconds or None, got {retention!r}")
        self.store = store
        self.models = stateful_scorers(scorers)
        self.interval = float(interval)
        self.instance = (instance or default_instance())[:_INSTANCE_MAX]
        self.retention = retention
        self._monotonic = monotonic
        self._join_timeout = join_timeout
        self._saved: dict[tuple[str, str], bytes] = {}  # digest of the last state saved or restored
        self._save_lock = threading.Lock()  # one save at a time (the thread and stop())
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # ------------------------------------------------------------------ restore
    def restore(self) -> dict[str, int]:
        """Load the best checkpoint of each stateful model (call before scoring starts).

        A checkpoint that does not load (another version or format, corrupt JSON, a state the
        model refuses) is logged as a WARNING naming the model and the reason; that model starts
        fresh. The store keeps the row, so nothing is deleted by a failed restore.

        Returns:
            Events learned per model name, as restored (0: starts fresh).

        Raises:
            StoreUnavailableError: the store could not be read (transient: retry, e.g. within the
                start-up retry policy, rather than starting every model fresh).
        """
        restored: dict[str, int] = {}
        for model in self.models:
            name, version = str(model.name), str(model.version)
            restored[name] = 0
            found = None
            try:
                found = self.store.load_model_checkpoint(name, version)
            except ValueError as exc:  # corrupt row: the repository names model, instance and error
                log.warning("model %r v%r starts fresh: %s", name, version, exc)
            if found is not None:
                state, meta = found
                try:
                    model.load_state_dict(state)
                except Exception as exc:  # noqa: BLE001 -- a plugin's load must never stop the scorer
                    log.warning(
                        "model %r v%r starts fresh: its checkpoint by %r (saved %s) does not load: %s: %s",
                        name, version, meta.instance, meta.saved_at.isoformat(), type(exc).__name__, exc,
                    )
                else:
                    restored[name] = meta.events_seen
                    log.info(
                        "model %r v%r restored from the checkpoint by %r (saved %s, %d events learned, %d bytes)",
                        name, version, meta.instance, meta.saved_at.isoformat(), meta.events_seen, meta.size,
                    )
            else:
                log.info("model %r v%r has no usable checkpoint: starts fresh", name, version)
            # What is in memory now counts as saved: an idle process does not write a copy.
            try:
                self._saved[(name, version)] = _digest(model.state_dict())
            except Exception:  # noqa: BLE001 -- save() reports a broken state_dict
                self._saved.pop((name, version), None)
        return restored

    # ------------------------------------------------------------------ save
    def save(self) -> int:
        """Checkpoint every stateful model that learned something since its last save.

        Never raises: a model whose state cannot be taken or stored is logged as a WARNING and
        tried again at the next call.

        Returns:
            Checkpoints written.
        """
        written = 0
        with self._save_lock:
            for model in self.models:
                name, version = str(model.name), str(model.version)
                try:
                    state = model.state_dict()
                    digest = _digest(state)
                    if self._saved.get((name, version)) == digest:
                        continue  # nothing learned since the last save
                    seen = events_seen_of(state)
                    self.store.save_model_checkpoint(name, version, self.instance, state, seen)
                except Exception as exc:  # noqa: BLE001 -- never into the workers; retried next interval
                    log.warning(
                        "checkpoint of model %r v%r failed (retried in %.0f s): %s: %s",
                        name, version, self.interval, type(exc).__name__, exc,
                    )
                    continue
                self._saved[(name, version)] = digest
                written += 1
                log.debug("checkpoint of model %r v%r saved as %r (%d events learned)", name, version, self.instance, seen)
        return written

    def prune(self) -> int:
        """Delete checkpoints older than ``retention`` (each model version's best one is kept).

        Returns:
            Rows deleted (0 without a retention, or when the store failed: logged as a WARNING).
        """
        if self.retention is None:
            return 0
        try:
            return self.store.prune_model_checkpoints(timedelta(seconds=self.retention))
        except Exception as exc:  # noqa: BLE001 -- housekeeping only
            log.warning("pruning model checkpoints failed: %s: %s", type(exc).__name__, exc)
            return 0

    # ------------------------------------------------------------------ lifecycle
    def start(self) -> None:
        """Save every ``interval`` seconds from a daemon thread (no thread without stateful models)."""
        if not self.models or self._thread is not None:
            return
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name="gateway-model-checkpoint", daemon=True)
        self._thread.start()

    def stop(self) -> int:
        """Stop the thread and save a final checkpoint (graceful shutdown loses nothing learned).

        Returns:
            Checkpoints written by the final save.
        """
        self._stop.set()
        thread, self._thread = self._thread, None
        if thread is not None:
            thread.join(self._join_timeout)
            if thread.is_alive():
                log.warning("model checkpoint thread still busy after %.0f s; saving anyway", self._join_timeout)
        return self.save()

    def _run(self) -> None:
        due = self._monotonic() + self.interval
        while not self._stop.wait(max(0.0, due - self._monotonic())):
            # A fixed cadence: a slow save does not push every later checkpoint back.
            due += self.interval
            now = self._monotonic()
            if due <= now:  # fell behind (a very slow store): do not save back to back
                due = now + self.interval
            try:
                self.save()
                self.prune()
            except Exception:  # pragma: no cover -- save() and prune() do not raise; keep the thread alive anyway
                log.exception("model checkpoint cycle failed")
