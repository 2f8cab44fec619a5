"""The OIP v2 remote scorer against a real local OIP server over loopback HTTP (tests/oip_server.py)."""

from __future__ import annotations

import base64
import logging
import math
import re
from collections.abc import Iterator
from typing import Any

import pytest

from gateway.config import ScoringSettings
from gateway.errors import (
    BackpressureError,
    ConfigurationError,
    ContractError,
    PermanentError,
    TransientError,
)
from gateway.events import Event
from gateway.resilience.budget import BudgetPolicy, RetryBudget
from gateway.scoring.oip import OipOptions, OipScorer, create
from tests.oip_server import OipServer
from tests.unit.test_scoring_worker import make_events

FEATURES = [{"name": "amount", "path": "data.amount", "type": "number"},
            {"name": "qty", "path": "data.qty", "type": "number", "default": 1}]


@pytest.fixture
def server() -> Iterator[OipServer]:
    with OipServer() as srv:
        yield srv


def options(srv: OipServer, **extra: Any) -> dict[str, Any]:
    return {"url": srv.url, "model": "fraud", "features": FEATURES, **extra}


def make(srv: OipServer, **extra: Any) -> OipScorer:
    return create("fraud", options(srv, **extra), ScoringSettings())


def expected(ev: Event) -> float:
    """The server's default model: sum of the row / 100 (amount, qty default 1)."""
    return (float(ev.data["amount"]) + float(ev.data.get("qty", 1))) / 100.0


def test_a_batch_is_one_request_of_the_documented_shape(server: OipServer) -> None:
    scorer = make(server)
    events = make_events(3)
    results = scorer.score_batch(events)

    [req] = server.infer_requests()
    assert req.path == "/v2/models/fraud/infer"
    assert req.body == {"inputs": [{
        "name": "input-0", "shape": [3, 2], "datatype": "FP32", "data": [10.5, 1.0, 11.5, 1.0, 12.5, 1.0],
    }]}
    assert [r.score for r in results] == pytest.approx([expected(e) for e in events])
    assert results[1].explanation == {"features": {"amount": 11.5, "qty": 1.0}, "output": "output-0",
                                      "raw": pytest.approx(0.125)}
    assert (scorer.name, scorer.version) == ("fraud", "3")  # the version from the metadata
    assert [r.method for r in server.requests] == ["GET", "POST"]  # metadata checked at start
    scorer.close()


def test_model_version_goes_into_both_paths(server: OipServer) -> None:
    scorer = make(server, model_version="3", input_name="input-0", output={"name": "output-0"})
    scorer.score_batch(make_events(1))
    assert [r.path for r in server.requests] == ["/v2/models/fraud/versions/3", "/v2/models/fraud/versions/3/infer"]
    assert server.infer_requests()[0].body["outputs"] == [{"name": "output-0"}]


def test_larger_batches_are_split_and_results_stay_in_order(server: OipServer) -> None:
    scorer = make(server, max_batch=4)
    events = make_events(10)
    results = scorer.score_batch(events)
    assert [r.body["inputs"][0]["shape"] for r in server.infer_requests()] == [[4, 2], [4, 2], [2, 2]]
    assert [r.score for r in results] == pytest.approx([expected(e) for e in events])


def test_the_feature_spec_of_the_extractor_gives_the_columns(server: OipServer) -> None:
    server.width = 6
    scorer = make(server, features=[
        {"name": "amount", "path": "data.payment.amount", "type": "number"},
        {"name": "qty", "path": "data.lines.1.qty", "type": "number"},
        {"name": "express", "path": "data.express", "type": "boolean"},
        {"name": "discount", "path": "data.discount", "type": "number", "default": -1},
        {"name": "country", "path": "data.country", "type": "category", "encoding": {"one_hot": {"categories": ["DE", "FR"]}}},
    ])
    ev = make_events(1)[0]
    data = {"payment": {"amount": "1e2"}, "lines": [{"qty": 1}, {"qty": 3}], "express": True, "discount": None,
            "country": "FR"}
    [result] = scorer.score_batch([Event(ev.id, ev.source, ev.type, ev.time, data)])
    assert server.infer_requests()[0].body["inputs"][0]["data"] == [100.0, 3.0, 1.0, -1.0, 0.0, 1.0]
    assert result.explanation is not None
    assert result.explanation["features"] == {"amount": 100.0, "qty": 3.0, "express": True, "discount": -1.0,
                                              "country": "FR"}


@pytest.mark.parametrize("data, message", [
    ({"qty": 2}, "feature 'amount': data.amount is missing and has no default"),
    ({"amount": "ten"}, "feature 'amount': data.amount = 'ten': expected a number"),
    ({"amount": True}, "feature 'amount': data.amount = True: expected a number, got a boolean"),
])
def test_an_event_without_a_usable_feature_is_a_contract_error(server: OipServer, data: Any, message: str) -> None:
    scorer = make(server)
    ev = make_events(1)[0]
    with pytest.raises(ContractError, match=re.escape(message)):
        scorer.score_batch([Event(ev.id, ev.source, ev.type, ev.time, data)])
    assert server.infer_requests() == []


@pytest.mark.parametrize("nested", [False, True])
def test_a_two_dimensional_output_takes_the_class_index_column(nested: bool) -> None:
    with OipServer(outputs=2, nested=nested) as srv:
        scorer = make(srv, output={"class_index": 1})
        events = make_events(3)
        results = scorer.score_batch(events)
        assert [r.score for r in results] == pytest.approx([expected(e) for e in events])
        assert results[0].explanation["raw"] == pytest.approx([1 - expected(events[0]), expected(events[0])])
        scorer0 = make(srv, output={"class_index": 0})
        assert scorer0.score_batch(events[:1])[0].score == pytest.approx(1 - expected(events[0]))


def test_a_two_dimensional_output_without_class_index(server: OipServer) -> None:
    with OipServer(outputs=2) as srv:
        with pytest.raises(ConfigurationError, match=r"scoring\.models\.fraud\.options\.output\.class_index: required"):
            make(srv)
        with pytest.raises(ConfigurationError, match=r"options\.output\.class_index: 2 is out of range"):
            make(srv, output={"class_index": 2})
        unchecked = make(srv, check_on_start=False)  # found out at the first answer instead
        with pytest.raises(ContractError, match="2 output values per event: set output.class_index"):
            unchecked.score_batch(make_events(2))


def test_sigmoid_and_identity_transforms_clip_to_the_unit_interval(server: OipServer) -> None:
    server.fn = lambda row: [row[0] - 11.5]  # a logit: 0 for the second event
    sig = make(server, output={"transform": "sigmoid"})
    events = make_events(3)  # amounts 10.5, 11.5, 12.5
    assert [r.score for r in sig.score_batch(events)] == pytest.approx([1 / (1 + math.e), 0.5, 1 / (1 + math.e ** -1)])
    ident = make(server)
    assert [r.score for r in ident.score_batch(events)] == [0.0, 0.0, 1.0]  # -1 -> 0, 0 -> 0, 1 -> 1
    server.fn = lambda row: [1e6]
    assert sig.score_batch(events[:1])[0].score == 1.0  # no overflow


@pytest.mark.parametrize("kind, message", [
    ("not-json", "not valid JSON"),
    ("no-outputs", "the answer has no outputs"),
    ("wrong-count", "does not fit 3 events"),
    ("nan", "NaN output"),
    ("string", "holds a str, not a number"),
    ("bad-shape", "does not fit 3 events"),
])
def test_malformed_answers_are_contract_errors(server: OipServer, kind: str, message: str) -> None:
    scorer = make(server)
    server.malformed(kind)
    with pytest.raises(ContractError, match=message) as info:
        scorer.score_batch(make_events(3))
    assert isinstance(info.value, PermanentError)
    assert len(server.infer_requests()) == 1  # never retried


def test_an_answer_without_the_named_output_is_a_contract_error(server: OipServer) -> None:
    scorer = make(server, output={"name": "output-0"})
    server.malformed("renamed")
    with pytest.raises(ContractError, match="the answer has no output 'output-0'"):
        scorer.score_batch(make_events(1))


def test_a_request_the_server_refuses_is_permanent(server: OipServer) -> None:
    scorer = make(server, output={"name": "scores"}, check_on_start=False)
    server.output_name = "scores"  # the request asks for it, the server validates it ...
    assert scorer.score_batch(make_events(1))[0].score == pytest.approx(0.115)
    server.output_name = "probabilities"  # ... and now refuses it: 400 is permanent
    with pytest.raises(PermanentError, match="HTTP 400"):
        scorer.score_batch(make_events(1))


@pytest.mark.parametrize("status", [500, 502, 503, 504])
def test_server_errors_are_transient_and_not_retried_in_process(server: OipServer, status: int) -> None:
    scorer = make(server)
    server.fail(status)
    with pytest.raises(TransientError, match=f"HTTP {status}") as info:
        scorer.score_batch(make_events(2))
    assert not isinstance(info.value, BackpressureError)
    assert len(server.infer_requests()) == 1  # the worker's breaker and delayed retry do the rest
    server.recover()
    assert len(scorer.score_batch(make_events(2))) == 2


@pytest.mark.parametrize("status, header, retry_after", [(429, "7", 7.0), (429, None, 1.0), (503, "3", 3.0)])
def test_overload_is_backpressure_with_retry_after(
    server: OipServer, status: int, header: str | None, retry_after: float
) -> None:
    scorer = make(server)
    server.fail(status, retry_after=header)
    with pytest.raises(BackpressureError) as info:
        scorer.score_batch(make_events(1))
    assert isinstance(info.value, TransientError) and info.value.retry_after == retry_after


def test_a_timeout_is_transient_and_not_retried(server: OipServer) -> None:
    scorer = make(server, timeout=0.2)
    server.slow(5.0)
    try:
        with pytest.raises(TransientError, match="ReadTimeout"):
            scorer.score_batch(make_events(1))
        assert len(server.infer_requests()) == 1
    finally:
        server.recover()


@pytest.mark.parametrize("status, error", [(401, ConfigurationError), (403, ConfigurationError),
                                           (400, PermanentError), (422, PermanentError)])
def test_refused_requests(server: OipServer, status: int, error: type[Exception]) -> None:
    scorer = make(server)
    server.fail(status)
    with pytest.raises(error, match=f"HTTP {status}") as info:
        scorer.score_batch(make_events(1))
    assert not isinstance(info.value, TransientError)
    assert len(server.infer_requests()) == 1


def test_a_dropped_connection_is_retried_once_in_process(server: OipServer) -> None:
    scorer = make(server)
    server.drop(1)
    assert len(scorer.score_batch(make_events(2))) == 2
    assert len(server.infer_requests()) == 2
    server.drop(5)
    with pytest.raises(TransientError, match="RemoteProtocolError"):
        scorer.score_batch(make_events(2))
    assert len(server.infer_requests()) == 4  # retry_attempts: 2


def test_the_in_process_retry_respects_the_budget(server: OipServer) -> None:
    empty = RetryBudget("oip:test", BudgetPolicy(ratio=0.0, reserve=0.0, min_retries_per_second=0.0))
    scorer = OipScorer("fraud", OipOptions.model_validate(options(server)), budget=empty)
    server.drop(1)
    with pytest.raises(TransientError):
        scorer.score_batch(make_events(1))
    assert len(server.infer_requests()) == 1 and empty.snapshot()["refused"] == 1
    assert make(server).budget.name == f"oip:{server.url}"


def test_connection_refused_is_transient(server: OipServer) -> None:
    scorer = make(server)
    server.stop()
    with pytest.raises(TransientError, match="ConnectError"):
        scorer.score_batch(make_events(1))


# ---------------------------------------------------------------------- start-up checks
@pytest.mark.parametrize("status", [404, 400])  # KServe / MLServer answer 404, Triton 400
def test_an_unknown_model_fails_at_start(status: int) -> None:
    with OipServer(unknown_model_status=status) as srv:
        with pytest.raises(ConfigurationError, match=rf"options\.model: model 'nope' not found .*HTTP {status}"):
            create("fraud", {**options(srv), "model": "nope"}, ScoringSettings())
        with pytest.raises(ConfigurationError, match=r"options\.model: model 'fraud' version '9' not found"):
            make(srv, model_version="9")


@pytest.mark.parametrize("extra, path, message", [
    ({"features": FEATURES[:1]}, "features", "give 1 columns (amount), but the model's input 'input-0' has shape [-1, 2]"),
    ({"input_name": "x"}, "input_name", "the model has no input 'x' (inputs: input-0)"),
    ({"datatype": "FP64"}, "datatype", "is FP32, not FP64 (set datatype: FP32)"),
    ({"output": {"name": "proba"}}, "output.name", "the model has no output 'proba' (outputs: output-0)"),
])
def test_metadata_contradicting_the_options_fails_at_start(
    server: OipServer, extra: dict[str, Any], path: str, message: str
) -> None:
    with pytest.raises(ConfigurationError) as info:
        make(server, **extra)
    assert str(info.value).startswith(f"scoring.models.fraud.options.{path}: ")
    assert message in str(info.value)


def test_rejected_credentials_and_an_unreachable_server_at_start() -> None:
    with OipServer(require_headers={"X-Api-Key": "right"}) as srv:
        with pytest.raises(ConfigurationError, match=r"options\.headers: .*HTTP 401"):
            make(srv, headers={"X-Api-Key": "wrong"})
        assert make(srv, headers={"X-Api-Key": "right"}).version == "3"
        url = srv.url
    with pytest.raises(TransientError, match="check_on_start: false skips it"):
        create("fraud", {"url": url, "model": "fraud", "features": FEATURES}, ScoringSettings())
    unchecked = create("fraud", {"url": url, "model": "fraud", "features": FEATURES, "check_on_start": False},
                       ScoringSettings())
    assert unchecked.version == "remote"


@pytest.mark.parametrize("versions, pinned, version", [(("1", "2"), None, "remote"), (("1", "2"), "1", "1"),
                                                      ((), None, "remote")])
def test_the_version_comes_from_the_metadata_else_the_option(
    versions: tuple[str, ...], pinned: str | None, version: str
) -> None:
    with OipServer(versions=versions) as srv:
        extra = {"model_version": pinned} if pinned else {}
        assert make(srv, **extra).version == version


# ---------------------------------------------------------------------- options
@pytest.mark.parametrize("opts, path", [
    ({"url": "ftp://models.local"}, "url"),
    ({"url": "http://models.local/?q=1"}, "url"),
    ({"features": []}, "features"),
    ({"features": [{"name": "a", "type": "number"}]}, "features[0].path"),
    ({"features": [{"name": "a", "path": "data.a", "type": "number", "weight": 2}]}, "features[0].weight"),
    ({"features": [{"name": "a", "path": "amount", "type": "number"}]}, "features[0].path"),
    ({"features": FEATURES + FEATURES[:1]}, "features"),
    ({"model": ""}, "model"),
    ({"timeout": 0}, "timeout"),
    ({"max_batch": 0}, "max_batch"),
    ({"output": {"transform": "tanh"}}, "output.transform"),
    ({"output": {"class_index": -1}}, "output.class_index"),
    ({"headers": {"Bad Header": "x"}}, "headers"),
    ({"retries": 3}, "retries"),
])
def test_invalid_options_name_their_path(opts: dict[str, Any], path: str) -> None:
    base = {"url": "http://models.local", "model": "fraud", "features": FEATURES}
    with pytest.raises(ConfigurationError) as info:
        create("fraud", {**base, **opts}, ScoringSettings())
    assert f"scoring.models.fraud.options.{path}: " in str(info.value)


def test_missing_options_are_named() -> None:
    with pytest.raises(ConfigurationError) as info:
        create("m1", {}, ScoringSettings())
    lines = str(info.value).splitlines()
    assert [line.split(":")[0] for line in lines] == [
        "scoring.models.m1.options.url", "scoring.models.m1.options.model", "scoring.models.m1.options.features"]


def test_a_timeout_longer_than_the_worker_allows_is_warned(caplog: pytest.LogCaptureFixture) -> None:
    opts = {"url": "http://models.local", "model": "fraud", "features": FEATURES, "timeout": 20,
            "check_on_start": False}
    with caplog.at_level(logging.WARNING, "gateway.scoring.oip"):
        create("fraud", opts, ScoringSettings(score_timeout=30))
    assert "exceeds scoring.score_timeout" in caplog.text


# ---------------------------------------------------------------------- secrets
def test_credentials_are_sent_but_never_logged_or_put_into_errors(caplog: pytest.LogCaptureFixture) -> None:
    password, token = "pw-9f3b1c", "tok-77ae2d"
    seen: list[str] = []
    with OipServer(require_headers={"X-Api-Key": token}) as srv:
        url = srv.url.replace("http://", f"http://svc:{password}@")
        with caplog.at_level(logging.DEBUG):  # every logger, httpx and httpcore included
            scorer = create("fraud", options(srv, url=url, headers={"X-Api-Key": token}), ScoringSettings())
            scorer.score_batch(make_events(2))
            for fault in (lambda: srv.fail(500), lambda: srv.fail(401), lambda: srv.fail(429),
                          lambda: srv.malformed("nan"), lambda: srv.drop(3)):
                fault()
                with pytest.raises(Exception) as info:
                    scorer.score_batch(make_events(2))
                exc: BaseException | None = info.value
                while exc is not None:  # the whole chain: the worker logs it with the traceback
                    seen.append(f"{type(exc).__name__}: {exc}")
                    exc = exc.__cause__ or exc.__context__
                srv.recover()
            with pytest.raises(ConfigurationError) as bad:
                create("fraud", options(srv, url=url, headers={"X-Api-Key": "tok-wrong"}), ScoringSettings())
            seen.append(str(bad.value))
        auth = [r.headers.get("Authorization") for r in srv.requests]
        assert auth[0] == "Basic " + base64.b64encode(f"svc:{password}".encode()).decode()  # basic auth from the URL
        assert all(r.headers.get("X-Api-Key") in (token, "tok-wrong") for r in srv.requests)
    with pytest.raises(TransientError) as down:  # the server is gone: connection refused at start
        create("fraud", options(srv, url=url, headers={"X-Api-Key": token}), ScoringSettings())
    seen.append(str(down.value))
    with pytest.raises(ConfigurationError) as invalid:
        create("fraud", {"url": f"ftp://svc:{password}@host", "model": "m", "features": FEATURES}, ScoringSettings())
    seen.append(str(invalid.value))
    seen += [repr(scorer), str(OipOptions.model_validate(options(srv, url=url, headers={"k": token}))),
             scorer.url, scorer.budget.name]
    seen += [r.getMessage() for r in caplog.records]
    assert len(seen) > 10 and any("HTTP 500" in s for s in seen)  # the errors were seen at all ...
    assert any(r.name == "httpx" for r in caplog.records) and any(r.name == "httpcore.http11" for r in caplog.records)
    assert any(f"{srv.url}/v2/models/fraud" in s for s in seen)  # ... and so were the URLs, without user info
    text = "\n".join(seen)
    assert password not in text and token not in text


def test_the_registry_builds_it_from_the_entry_point(server: OipServer) -> None:
    from gateway.scoring.registry import build_scorer

    settings = ScoringSettings.model_validate(
        {"model": "fraud", "models": {"fraud": {"kind": "oip", "options": options(server)}}}
    )
    scorer = build_scorer("fraud", settings)
    assert isinstance(scorer, OipScorer) and (scorer.name, scorer.version) == ("fraud", "3")
    assert scorer.score_batch(make_events(1))[0].score == pytest.approx(0.115)
