"""The standard adapter suite against the drop-folder adapter, for CSV and fixed-width files."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

from adapters.testing import AdapterContract
from gateway_dropfolder import DropFolderSource

FIXED = {"format": "fixed", "record_length": 16, "encoding": "cp037",
         "layout": [{"name": "id", "pic": "9(6)"}, {"name": "customer", "pic": "X(10)"}]}


def _disk_unavailable(self: Any, path: Path) -> list[dict[str, Any]]:
    raise OSError(f"{path}: disk unavailable")


class TestDropFolderCsv(AdapterContract):
    adapter_class = DropFolderSource
    mapping = {"type": "com.acme.order.dropped", "entity": "order", "key": ["id"], "version": "version"}

    folder: Path
    added = 0
    files = 0

    @pytest.fixture(autouse=True)
    def _folder(self, tmp_path: Path) -> None:
        self.folder = tmp_path / "drop"
        self.folder.mkdir()

    def _drop(self, rows: list[tuple[int, int]]) -> None:
        self.files += 1
        text = "id,customer,version\n" + "".join(f"{i},C{i:04d},{v}\n" for i, v in rows)
        (self.folder / f"20240501-{self.files:04d}.csv").write_text(text, encoding="utf-8")

    def valid_config(self) -> dict[str, Any]:
        return {"path": str(self.folder)}

    def add_records(self, n: int) -> None:
        self._drop([(i, 1) for i in range(self.added + 1, self.added + n + 1)])
        self.added += n

    def invalid_configs(self) -> list[tuple[dict[str, Any], str]]:
        return [*super().invalid_configs(), ({"pattern": "*.csv"}, "path")]

    def unreachable_config(self) -> dict[str, Any]:
        return {"path": str(self.folder / "missing")}

    def update_record(self) -> None:
        self._drop([(1, 2)])  # the legacy system sends order 1 again, as a new version

    @contextmanager
    def transient_failure(self) -> Iterator[None]:
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(DropFolderSource, "_records", _disk_unavailable)
            yield

    @contextmanager
    def permanent_failure(self) -> Iterator[None]:
        bad = self.folder / "0000-bad.csv"  # sorts first; a row with too many fields
        bad.write_text("id,customer,version\n1,A,1,surplus\n", encoding="utf-8")
        try:
            yield
        finally:
            bad.unlink()


class TestDropFolderFixedWidth(TestDropFolderCsv):
    """EBCDIC fixed-width records (no line breaks), decoded by the gateway's fixed codec."""

    mapping = {"type": "com.acme.order.dropped", "entity": "order", "key": ["id"]}

    def valid_config(self) -> dict[str, Any]:
        return {"path": str(self.folder), "pattern": "*.dat", "codec": FIXED}

    def add_records(self, n: int) -> None:
        self.files += 1
        body = "".join(f"{i:06d}{f'C{i:04d}':<10}" for i in range(self.added + 1, self.added + n + 1)).encode("cp037")
        (self.folder / f"20240501-{self.files:04d}.dat").write_bytes(body)
        self.added += n

    def update_record(self) -> None:
        raise NotImplementedError  # no version field in this layout

    @contextmanager
    def permanent_failure(self) -> Iterator[None]:
        bad = self.folder / "0000-bad.dat"
        bad.write_bytes(b"\x00" * 7)  # not a multiple of record_length
        try:
            yield
        finally:
            bad.unlink()


def test_committed_files_move_to_done(tmp_path: Path) -> None:
    """Files move to done/ only after the commit, and a crash before the move only delays it."""
    (tmp_path / "a.csv").write_text("id\n1\n2\n", encoding="utf-8")
    (tmp_path / "b.csv").write_text("id\n3\n", encoding="utf-8")
    src = DropFolderSource(DropFolderSource.parse_config({"path": str(tmp_path)}), source_name="drop")  # type: ignore[arg-type]
    src.open()
    first = src.fetch(None, 2)
    assert [r.data["id"] for r in first.records] == ["1", "2"]
    assert (tmp_path / "a.csv").exists()  # not committed yet: still there
    # crash: committed() never ran; the next poll from the committed cursor covers a.csv again
    second = src.fetch(first.cursor, 2)
    assert [r.data["id"] for r in second.records] == ["3"]
    src.committed(second)
    assert sorted(p.name for p in (tmp_path / "done").iterdir()) == ["a.csv", "b.csv"]
    assert src.fetch(second.cursor, 2).records == []
