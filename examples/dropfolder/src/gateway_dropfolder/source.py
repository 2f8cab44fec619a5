"""The ``dropfolder`` adapter: every record of every flat file dropped into a folder becomes an event.

A legacy system writes files (CSV, or fixed-width records, in any encoding the gateway codecs
read) into a folder. The adapter reads them in name order, record by record, and moves each file
to ``done/`` once all its records are committed to the gateway's outbox.

Crash safety: the cursor ``{"file": <name>, "line": <last record read>}`` is committed with the
events. A file is moved only in :meth:`DropFolderSource.committed`, after that commit, and the move
is repeated on later polls for every file the committed cursor covers -- so a crash between the
commit and the move only delays the move, and a crash before the commit re-reads the batch with
the same event ids.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pydantic import Field

from adapters.base import Batch, ConfigurationError, GatewayError, PermanentError, PollingSource, Record, SourceConfig
from gateway.codecs import Codec, DecodeError, codec_from_config


class DropFolderConfig(SourceConfig):
    """Settings of the ``dropfolder`` adapter (the ``config:`` block of a source)."""

    path: str = Field(..., description="Folder the legacy system drops its files into.")
    pattern: str = Field("*.csv", description="Glob of the files to read; they are read in name order.")
    done_folder: str = Field("done", description="Sub-folder (of path) that fully committed files are moved to.")
    codec: dict[str, Any] = Field(
        default_factory=lambda: {"format": "csv", "header": True},
        description="How a file decodes into records: a gateway codec block, e.g. {format: csv, delimiter: ';'} or "
        "{format: fixed, record_length: 33, layout: [...]} (docs/codecs.md).",
    )


class DropFolderSource(PollingSource[DropFolderConfig]):
    """Reads complete files in name order and moves each one to ``done/`` after its commit.

    Files must appear complete (written elsewhere, then renamed into the folder), never change
    afterwards, and have names that sort in arrival order (a timestamp prefix).
    """

    kind = "dropfolder"
    config_model = DropFolderConfig

    def __init__(self, config: DropFolderConfig, *, source_name: str) -> None:
        super().__init__(config, source_name=source_name)
        try:
            self.codec: Codec = codec_from_config(config.codec)
        except (ValueError, ConfigurationError) as exc:
            raise ConfigurationError(f"source {source_name!r}: config.codec: {exc}") from None

    def _folder(self) -> Path:
        folder = Path(self.config.path)
        if not folder.is_dir():
            raise ConfigurationError(f"source {self.source_name!r}: config.path: {str(folder)!r} is not a folder")
        return folder

    def open(self) -> None:
        """Check the folder and create ``done/``."""
        (self._folder() / self.config.done_folder).mkdir(exist_ok=True)

    def _records(self, path: Path) -> list[dict[str, Any]]:
        """All records of one file, decoded by the configured codec."""
        return self.codec.decode(path.read_bytes())

    def fetch(self, cursor: Any, limit: int) -> Batch:
        """Read up to ``limit`` records after ``cursor``.

        The batch's token lists the files the returned cursor covers completely: :meth:`committed`
        moves them.
        """
        done_file, done_line = (cursor["file"], cursor["line"]) if cursor else ("", 0)
        records: list[Record] = []
        finished: list[str] = []  # files the cursor after this batch covers completely
        for path in sorted(p for p in self._folder().glob(self.config.pattern) if p.is_file()):
            if path.name < done_file:
                finished.append(path.name)  # committed earlier; its move did not happen yet
                continue
            skip = done_line if path.name == done_file else 0
            rows = self._records(path)
            for line, row in enumerate(rows, start=1):
                if line <= skip:
                    continue
                if len(records) == limit:
                    return Batch(records, cursor=records[-1].position, has_more=True, token=finished)
                records.append(Record(data=row, position={"file": path.name, "line": line}))
            finished.append(path.name)  # every record of it is in this batch or an earlier one
        return Batch(records, cursor=records[-1].position if records else cursor, has_more=False, token=finished)

    def committed(self, batch: Batch) -> None:
        """Move the files the committed cursor covers to ``done/`` (never before the commit)."""
        folder = Path(self.config.path)
        for name in batch.token or ():
            src = folder / name
            if src.exists():
                src.replace(folder / self.config.done_folder / name)

    def classify_error(self, exc: BaseException) -> GatewayError:
        """A file the codec cannot decode is permanent; I/O errors are transient (the default)."""
        if isinstance(exc, (DecodeError, UnicodeDecodeError)):
            err = PermanentError(f"source {self.source_name!r}: undecodable file: {exc}")
            err.__cause__ = exc
            return err
        return super().classify_error(exc)
