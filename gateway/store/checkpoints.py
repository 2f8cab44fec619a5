"""Checkpoints of stateful models' learned state (issue 7), so a restart does not forget it.

A scorer process checkpoints each stateful model (``state_dict()``/``load_state_dict()``, such as
the built-in ``online-anomaly``) under its own **instance** id: one row per (model name, model
version, instance), overwritten at every save. Several scorer processes compete for the scoring
queue, so each learns only part of the stream and each writes its own row; none overwrites what
another learned. A restarting process loads the **best** row of its model version: the one that
learned from the most events (``events_seen``), ties broken by the newest ``saved_at``. Learned
states cannot in general be merged, so the most-informed one is the best single start; a process
that restored it and learned more then writes a row better still.

The state is stored as standard JSON text (ASCII only, so any column character set holds it;
floats in Python's shortest exact form, so a restored model computes exactly the same scores).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import Engine, and_, delete, func, select, update

from gateway.store._sql import guard, insert_ignore
from gateway.store.schema import model_checkpoints

__all__ = ["CheckpointMeta", "ModelCheckpointRepository"]


@dataclass(frozen=True, slots=True)
class CheckpointMeta:
    """Where a loaded checkpoint came from.

    Attributes:
        model_name, model_version: the model.
        instance: the scorer process that wrote it.
        events_seen: events the state had learned from.
        saved_at: when it was written (aware UTC, the store's clock).
        size: length of the stored JSON text, in characters.
    """

    model_name: str
    model_version: str
    instance: str
    events_seen: int
    saved_at: datetime
    size: int


def _best_first() -> tuple[Any, ...]:
    """Best row first: most events learned, then newest, then a fixed order (deterministic)."""
    c = model_checkpoints.c
    return (c.events_seen.desc(), c.saved_at.desc(), c.instance.desc())


class ModelCheckpointRepository:
    """Model checkpoint methods of :class:`~gateway.store.EventStore` (mixed in)."""

    engine: Engine
    _clock: Callable[[], datetime]

    def save_model_checkpoint(
        self, model_name: str, model_version: str, instance: str, state: dict[str, Any], events_seen: int
    ) -> datetime:
        """Write (insert or overwrite) ``instance``'s checkpoint of a model version.

        Args:
            model_name: the model's name (its configured name).
            model_version: the model's version; a checkpoint only loads into the same version.
            instance: the writing scorer process's id (one row per process).
            state: the model's ``state_dict()``: JSON-safe data.
            events_seen: events the state has learned from (ranks the rows, see the module doc).

        Returns:
            The ``saved_at`` written.

        Raises:
            ValueError: ``state`` is not JSON data (a NaN, an object JSON cannot hold), or
                ``events_seen`` is negative.
            StoreUnavailableError: the transaction did not commit.
        """
        if events_seen < 0:
            raise ValueError(f"events_seen must be >= 0, got {events_seen}")
        try:
            # allow_nan=False: NaN/Infinity are not JSON, and another reader would refuse them.
            text = json.dumps(state, separators=(",", ":"), allow_nan=False)
        except (TypeError, ValueError) as exc:
            raise ValueError(f"checkpoint state of model {model_name!r} v{model_version!r} is not JSON data: {exc}") from exc
        now = self._clock()
        c = model_checkpoints.c
        key = and_(c.model_name == model_name, c.model_version == model_version, c.instance == instance)
        values = {"state": text, "events_seen": int(events_seen), "saved_at": now}
        row = {"model_name": model_name, "model_version": model_version, "instance": instance, **values}
        with guard("save_model_checkpoint"), self.engine.begin() as conn:
            # Update first (the usual case: this process saved before); insert if absent; a
            # concurrent insert of the same key (cannot happen within one process) updates again.
            if not conn.execute(update(model_checkpoints).where(key).values(**values)).rowcount:
                ins = insert_ignore(conn, model_checkpoints, ["model_name", "model_version", "instance"])
                if not conn.execute(ins, row).rowcount:
                    conn.execute(update(model_checkpoints).where(key).values(**values))
        return now

    def load_model_checkpoint(self, model_name: str, model_version: str) -> tuple[dict[str, Any], CheckpointMeta] | None:
        """The best checkpoint of a model version: most ``events_seen``, then newest ``saved_at``.

        Only that row's state is read, however many processes wrote rows.

        Returns:
            ``(state, meta)``, or ``None`` when no process checkpointed this model version.

        Raises:
            ValueError: the best row's state is not valid JSON or not a JSON object (names the
                model, the instance and the parse error).
            StoreUnavailableError: the query failed.
        """
        c = model_checkpoints.c
        query = (
            select(c.instance, c.state, c.events_seen, c.saved_at)
            .where(c.model_name == model_name, c.model_version == model_version)
            .order_by(*_best_first())
            .limit(1)
        )
        with guard("load_model_checkpoint"), self.engine.connect() as conn:
            row = conn.execute(query).first()
        if row is None:
            return None
        where = f"checkpoint of model {model_name!r} v{model_version!r} written by {row.instance!r}"
        try:
            state = json.loads(row.state)
        except ValueError as exc:
            raise ValueError(f"{where} is not valid JSON: {exc}") from exc
        if not isinstance(state, dict):
            raise ValueError(f"{where} is a JSON {type(state).__name__}, expected an object")  # noqa: TRY004 -- stored data, not an argument
        meta = CheckpointMeta(model_name, model_version, row.instance, int(row.events_seen), row.saved_at, len(row.state))
        return state, meta

    def list_model_checkpoints(self, model_name: str | None = None) -> list[CheckpointMeta]:
        """Every checkpoint row (without its state), best first within each model version.

        Args:
            model_name: only this model's rows (default: every model).
        """
        c = model_checkpoints.c
        query = select(c.model_name, c.model_version, c.instance, c.events_seen, c.saved_at, func.length(c.state))
        query = query.order_by(c.model_name, c.model_version, *_best_first())
        if model_name is not None:
            query = query.where(c.model_name == model_name)
        with guard("list_model_checkpoints"), self.engine.connect() as conn:
            rows = conn.execute(query).all()
        return [
            CheckpointMeta(r.model_name, r.model_version, r.instance, int(r.events_seen), r.saved_at, int(r[5] or 0))
            for r in rows
        ]

    def prune_model_checkpoints(self, older_than: datetime | timedelta) -> int:
        """Delete checkpoints saved before ``older_than``, except each model version's best row.

        Every process start writes a row under a new instance id, so rows of processes that are
        gone pile up; pruning keeps the table small. The best row of each model version is kept
        whatever its age: it may be the only record of what the model learned.

        Args:
            older_than: aware UTC time, rows saved strictly before it go; or an age, counted back
                from the store's clock.

        Returns:
            Rows deleted.

        Raises:
            StoreUnavailableError: the transaction did not commit.
        """
        if isinstance(older_than, timedelta):
            older_than = self._clock() - older_than
        c = model_checkpoints.c
        deleted = 0
        with guard("prune_model_checkpoints"), self.engine.begin() as conn:
            models = conn.execute(
                select(c.model_name, c.model_version).where(c.saved_at < older_than).distinct()
            ).all()
            for name, version in models:
                mine = and_(c.model_name == name, c.model_version == version)
                best = conn.execute(select(c.instance).where(mine).order_by(*_best_first()).limit(1)).scalar_one()
                res = conn.execute(
                    delete(model_checkpoints).where(mine, c.saved_at < older_than, c.instance != best)
                )
                deleted += int(res.rowcount or 0)
        return deleted

    def delete_model_checkpoints(self, model_name: str, model_version: str | None = None) -> int:
        """Forget what a model learned: delete its checkpoints (every version unless one is given).

        Running scorer processes keep their in-memory state and write it again at their next
        checkpoint; stop them first to reset the model (docs/scoring.md, "Model state checkpoints").

        Returns:
            Rows deleted.

        Raises:
            StoreUnavailableError: the transaction did not commit.
        """
        c = model_checkpoints.c
        cond = [c.model_name == model_name]
        if model_version is not None:
            cond.append(c.model_version == model_version)
        with guard("delete_model_checkpoints"), self.engine.begin() as conn:
            return int(conn.execute(delete(model_checkpoints).where(*cond)).rowcount or 0)

