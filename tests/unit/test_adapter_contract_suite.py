"""The standard suite fails adapters that break the contract (so its checks can fail)."""

from __future__ import annotations

import pytest

pytest_plugins = ["pytester"]

_MODULE = '''
from typing import Any
import uuid

import pytest
from pydantic import Field

from adapters.base import Batch, PollingSource, Record, SourceConfig
from adapters.testing import AdapterContract

ROWS: list[dict[str, Any]] = []


class ListConfig(SourceConfig):
    name: str = Field("rows", description="Which list.")


class ListSource(PollingSource[ListConfig]):
    kind = "list"
    config_model = ListConfig
    BUG = ""

    def fetch(self, cursor: Any, limit: int) -> Batch:
        start = cursor or 0
        rows = ROWS[start:start + limit]
        recs = [Record(data=dict(r), position={"row": start + i}) for i, r in enumerate(rows)]
        end = start + len(rows)
        if self.BUG == "skip" and rows:
            end += 1  # the cursor jumps past a record it did not return
        if self.BUG == "random-key":
            recs = [Record(data={**r.data, "id": uuid.uuid4().hex}, position=r.position) for r in recs]
        return Batch(recs, cursor=end, has_more=end < len(ROWS))


class TestList(AdapterContract):
    adapter_class = ListSource
    mapping = {"type": "com.example.row", "entity": "row", "key": ["id"]}

    @pytest.fixture(autouse=True)
    def _rows(self):
        ROWS.clear()
        ListSource.BUG = "%s"

    def valid_config(self):
        return {}

    def add_records(self, n):
        ROWS.extend({"id": len(ROWS) + 1} for _ in range(n))
'''


def _outcomes(pytester: pytest.Pytester, bug: str) -> dict[str, str]:
    pytester.makepyfile(test_list=_MODULE % bug)
    result = pytester.runpytest_inprocess("-q", "-p", "no:cacheprovider", "-rA")
    outcomes: dict[str, str] = {}
    for report in result.reprec.getreports("pytest_runtest_logreport"):  # type: ignore[attr-defined]
        if report.when == "call" or report.outcome != "passed":
            outcomes[report.nodeid.rsplit("::", 1)[1]] = report.outcome
    return outcomes


def test_a_correct_adapter_passes(pytester: pytest.Pytester) -> None:
    outcomes = _outcomes(pytester, "")
    assert outcomes["test_no_loss_or_duplication_across_a_restart"] == "passed"
    assert outcomes["test_an_updated_record_becomes_a_new_event"] == "skipped"
    assert "failed" not in outcomes.values(), outcomes


def test_a_cursor_that_skips_records_fails(pytester: pytest.Pytester) -> None:
    outcomes = _outcomes(pytester, "skip")
    assert outcomes["test_cursor_is_json_safe_and_monotonic"] == "failed"
    assert outcomes["test_no_loss_or_duplication_across_a_restart"] == "failed"
    assert outcomes["test_resume_after_a_crash_mid_batch"] == "failed"


def test_nondeterministic_ids_fail(pytester: pytest.Pytester) -> None:
    outcomes = _outcomes(pytester, "random-key")
    assert outcomes["test_ids_are_deterministic"] == "failed"
