"""The ONNX scorer (gateway.scoring.onnx) against scikit-learn models trained and exported here.

Acceptance (issue 7): a model trained at test time, exported with skl2onnx and scored through the
scorer gives scikit-learn's own predictions. The feature matrix for scikit-learn is built with the
gateway's extractor, so both see identical columns.
"""

from __future__ import annotations

import hashlib
import sys
import threading
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper
from skl2onnx import to_onnx
from skl2onnx.common.data_types import FloatTensorType
from sklearn.ensemble import IsolationForest, RandomForestClassifier
from sklearn.linear_model import LinearRegression, LogisticRegression

from gateway.config import ScoringSettings
from gateway.errors import ConfigurationError, ContractError
from gateway.events import Event
from gateway.scoring import Scorer, ScoreResult
from gateway.scoring.extract import FeatureExtractor
from gateway.scoring.onnx import OnnxScorer, create

T0 = datetime(2024, 1, 1, tzinfo=timezone.utc)
TARGET_OPSET = {"": 17, "ai.onnx.ml": 3}
COUNTRIES = ["DE", "FR", "US", "GB"]  # GB is not in the spec's categories: it encodes as all zeros

FEATURES: list[dict[str, Any]] = [
    {"name": "amount", "path": "data.amount", "type": "number"},
    {"name": "hour", "path": "data.hour", "type": "number", "default": 12},
    {"name": "country", "path": "data.customer.country", "type": "category",
     "encoding": {"one_hot": {"categories": ["DE", "FR", "US"]}}},
    {"name": "card_present", "path": "data.card_present", "type": "boolean", "default": False},
    {"name": "merchant", "path": "data.merchant", "type": "category", "encoding": {"hash": {"buckets": 4}}},
]


def payment_events(n: int, seed: int = 7) -> tuple[list[Event], np.ndarray]:
    """Payment-like events (decimal-string amounts, nested country) and a fraud label."""
    rng = np.random.default_rng(seed)
    events, labels = [], []
    for i in range(n):
        amount = float(np.round(rng.lognormal(3.5, 1.0), 2))
        country = COUNTRIES[int(rng.integers(0, 4))]
        present = bool(rng.random() < 0.6)
        hour = int(rng.integers(0, 24))
        risk = 0.02 * amount / 30 + (0.8 if country == "US" else 0) + (0.9 if not present else 0) + (0.5 if hour < 5 else 0)
        labels.append(int(rng.random() < 1 / (1 + np.exp(-(risk - 1.5)))))
        data: dict[str, Any] = {"amount": f"{amount:.2f}", "customer": {"country": country},
                                "card_present": present, "merchant": f"m-{int(rng.integers(0, 30))}"}
        if i % 10:  # every tenth event lacks the hour: the default (12) is used
            data["hour"] = hour
        events.append(Event(id=f"evt-{i}", source="/legacy-gateway/sources/payments", type="com.acme.payment",
                            time=T0, subject=f"payment/{i}", data=data))
    return events, np.array(labels)


@pytest.fixture(scope="module")
def training() -> tuple[list[Event], np.ndarray, np.ndarray]:
    events, labels = payment_events(400)
    matrix = FeatureExtractor.from_config(FEATURES).extract(events).matrix
    return events, matrix, labels


def save(model: Any, path: Path, width: int, **options: Any) -> Path:
    onx = to_onnx(model, initial_types=[("input", FloatTensorType([None, width]))],
                  target_opset=TARGET_OPSET, options=options or None)
    path.write_bytes(onx.SerializeToString())
    return path


def scorer(path: Path, name: str = "fraud", **options: Any) -> OnnxScorer:
    return create(name, {"path": str(path), "features": FEATURES, **options}, ScoringSettings())


def scores(results: list[ScoreResult]) -> np.ndarray:
    return np.array([r.score for r in results])


@pytest.mark.parametrize(
    ("make", "export_options", "output_type"),
    [
        (lambda: LogisticRegression(max_iter=500), {}, "seq(map(int64,tensor(float)))"),
        (lambda: LogisticRegression(max_iter=500), {"zipmap": False}, "tensor(float)"),
        (lambda: RandomForestClassifier(n_estimators=15, max_depth=5, random_state=0), {}, "seq(map(int64,tensor(float)))"),
        (lambda: RandomForestClassifier(n_estimators=15, max_depth=5, random_state=0), {"zipmap": False}, "tensor(float)"),
    ],
    ids=["logreg-zipmap", "logreg-tensor", "forest-zipmap", "forest-tensor"],
)
def test_classifier_scores_equal_sklearn_predict_proba(
    training: Any, tmp_path: Path, make: Any, export_options: dict[str, Any], output_type: str
) -> None:
    events, matrix, labels = training
    model = make().fit(matrix, labels)
    path = save(model, tmp_path / "fraud.onnx", matrix.shape[1], **export_options)
    s = scorer(path)  # output defaults: the first output fitting "probability", class_index 1
    assert isinstance(s, Scorer)
    assert [o.type for o in s._session.get_outputs() if o.name == s._output_name] == [output_type]
    results = s.score_batch(events)
    expected = model.predict_proba(matrix)[:, 1]
    assert len(results) == len(events)
    assert np.allclose(scores(results), expected, atol=1e-5)
    assert 0.05 < expected.mean() < 0.95 and expected.std() > 0.05  # a model that learned something
    # Batches of any size give the same scores as the whole.
    assert np.allclose(scores(s.score_batch(events[3:4]) + s.score_batch(events[4:50])), expected[3:50], atol=1e-5)


def test_classifier_label_output(training: Any, tmp_path: Path) -> None:
    events, matrix, labels = training
    model = LogisticRegression(max_iter=500).fit(matrix, labels)
    s = scorer(save(model, tmp_path / "m.onnx", matrix.shape[1]), output={"kind": "label"})
    assert s._output_name == "output_label"
    assert scores(s.score_batch(events)).tolist() == model.predict(matrix).astype(float).tolist()


def test_isolation_forest_with_inverted_minmax(training: Any, tmp_path: Path) -> None:
    events, matrix, _ = training
    model = IsolationForest(n_estimators=30, random_state=0).fit(matrix)
    path = save(model, tmp_path / "iso.onnx", matrix.shape[1])
    # decision_function: positive = normal, negative = anomalous; min > max turns it into "higher = more unusual".
    s = scorer(path, output={"name": "scores", "kind": "score", "transform": {"minmax": {"min": 0.02, "max": -0.1}}})
    results = s.score_batch(events)
    expected = np.clip((model.decision_function(matrix) - 0.02) / (-0.1 - 0.02), 0.0, 1.0)
    assert np.allclose(scores(results), expected, atol=1e-5)
    # Both clipping ends and the linear part are exercised.
    assert (expected == 0.0).any() and (expected == 1.0).any() and ((expected > 0) & (expected < 1)).any()
    raw = results[0].explanation["raw"]  # type: ignore[index]
    assert raw == pytest.approx(model.decision_function(matrix[:1])[0], abs=1e-5)


def test_regressor_with_sigmoid(training: Any, tmp_path: Path) -> None:
    events, matrix, labels = training
    model = LinearRegression().fit(matrix, labels * 4.0 - 2.0)
    s = scorer(save(model, tmp_path / "reg.onnx", matrix.shape[1]), output={"kind": "score", "transform": "sigmoid"})
    expected = 1.0 / (1.0 + np.exp(-model.predict(matrix)))
    assert np.allclose(scores(s.score_batch(events)), expected, atol=1e-5)


def test_explanation_holds_feature_values_and_raw_output(training: Any, tmp_path: Path) -> None:
    events, matrix, labels = training
    model = LogisticRegression(max_iter=500).fit(matrix, labels)
    s = scorer(save(model, tmp_path / "m.onnx", matrix.shape[1]))
    first, tenth = s.score_batch([events[1], events[10]])
    data = events[1].data
    assert first.explanation is not None and tenth.explanation is not None
    assert first.explanation["features"] == {
        "amount": float(data["amount"]), "hour": float(data["hour"]), "country": data["customer"]["country"],
        "card_present": data["card_present"], "merchant": data["merchant"],
    }
    assert tenth.explanation["features"]["hour"] == 12.0  # the default
    assert first.explanation["output"] == "output_probability"
    proba = model.predict_proba(matrix[1:2])[0]
    assert set(first.explanation["raw"]) == {"0", "1"}
    assert first.explanation["raw"]["1"] == pytest.approx(proba[1], abs=1e-5) == first.score


def test_version_is_the_file_hash_and_changes_with_the_file(training: Any, tmp_path: Path) -> None:
    _, matrix, labels = training
    path = save(LogisticRegression(max_iter=500).fit(matrix, labels), tmp_path / "m.onnx", matrix.shape[1])
    v1 = scorer(path).version
    assert v1 == hashlib.sha256(path.read_bytes()).hexdigest()[:12]
    assert scorer(path).version == v1  # same file, same version
    save(LogisticRegression(max_iter=500, C=0.01).fit(matrix, labels), path, matrix.shape[1])
    v2 = scorer(path).version
    assert v2 != v1 and v2 == hashlib.sha256(path.read_bytes()).hexdigest()[:12]


def test_missing_feature_without_default_is_a_contract_error(training: Any, tmp_path: Path) -> None:
    events, matrix, labels = training
    s = scorer(save(LogisticRegression(max_iter=500).fit(matrix, labels), tmp_path / "m.onnx", matrix.shape[1]))
    bad = Event(id="evt-broken", source="/s", type="com.acme.payment", time=T0, data={"customer": {"country": "DE"}})
    with pytest.raises(ContractError, match=r"evt-broken.*data\.amount is missing"):
        s.score_batch([events[0], bad])
    not_a_number = Event(id="evt-text", source="/s", type="t", time=T0, data={**events[0].data, "amount": "twelve"})
    with pytest.raises(ContractError, match=r"evt-text.*data\.amount"):
        s.score_batch([not_a_number])


def test_input_width_mismatch_is_a_configuration_error(training: Any, tmp_path: Path) -> None:
    _, matrix, labels = training
    path = save(LogisticRegression(max_iter=500).fit(matrix[:, :5], labels), tmp_path / "m.onnx", 5)
    with pytest.raises(ConfigurationError) as info:
        scorer(path)
    msg = str(info.value)
    assert msg.startswith("scoring.models.fraud.options.features: the features give 10 columns (amount, hour, country=DE")
    assert "expects 5" in msg


@pytest.mark.parametrize(
    ("options", "expected"),
    [
        ({"output": {"name": "nope"}}, r"options\.output\.name: the model has no output 'nope'; expected one of: output_label, output_probability"),
        ({"input": "x"}, r"options\.input: the model has no input 'x'; expected one of: input"),
        ({"output": {"class_index": 2}}, r"options\.output\.class_index: 2 is out of range; the model gives 2 class probabilities"),
        ({"output": {"name": "output_probability", "kind": "score"}}, r"options\.output\.kind: output 'output_probability' is a seq"),
        ({"output": {"kind": "score"}}, r"options\.output\.name: no output of the model fits kind 'score'"),
        ({"output": {"transform": "tanh"}}, r"options\.output\.transform: Input should be 'identity' or 'sigmoid' \(got 'tanh'\)"),
        ({"output": {"transform": {"minmax": {"min": 1, "max": 1}}}}, r"options\.output\.transform\.minmax: min and max must differ"),
        ({"output": {"kind": "probabilities"}}, r"options\.output\.kind: Input should be 'probability', 'label' or 'score'"),
        ({"threads": 4}, r"options\.threads: unknown option; expected one of: path, features, input, output, intra_op_threads"),
        ({"intra_op_threads": 0}, r"options\.intra_op_threads: Input should be greater than or equal to 1 \(got 0\)"),
        ({"features": [{"name": "a", "path": "data.a", "type": "category"}]}, r"options\.features\.0\.encoding: a category feature needs"),
    ],
)
def test_bad_options_name_the_path(training: Any, tmp_path: Path, options: dict[str, Any], expected: str) -> None:
    _, matrix, labels = training
    path = save(LogisticRegression(max_iter=500).fit(matrix, labels), tmp_path / "m.onnx", matrix.shape[1])
    with pytest.raises(ConfigurationError, match=rf"(^|; )scoring\.models\.fraud\.{expected}"):
        create("fraud", {"path": str(path), "features": FEATURES, **options}, ScoringSettings())


def test_missing_path_option_and_unreadable_files(tmp_path: Path) -> None:
    with pytest.raises(ConfigurationError, match=r"^scoring\.models\.fraud\.options\.path: required option is missing$"):
        create("fraud", {"features": FEATURES}, ScoringSettings())
    with pytest.raises(ConfigurationError, match=r"options\.path: cannot read the model file '.*absent\.onnx'"):
        scorer(tmp_path / "absent.onnx")
    garbage = tmp_path / "garbage.onnx"
    garbage.write_bytes(b"this is not a protobuf")
    with pytest.raises(ConfigurationError, match=r"options\.path: '.*garbage\.onnx' is not a loadable ONNX model"):
        scorer(garbage)


def test_missing_onnxruntime_names_the_extra(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # import fails as if not installed
    with pytest.raises(ConfigurationError, match=r"legacy-gateway\[onnx\]"):
        scorer(tmp_path / "m.onnx")


def graph_model(path: Path, op: str, width: Any = 1) -> Path:
    """A one-node model y = op(x) with x of shape (batch, width); ``width`` may be symbolic."""
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", width])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", width])
    model = helper.make_model(helper.make_graph([helper.make_node(op, ["x"], ["y"])], "g", [x], [y]),
                              opset_imports=[helper.make_opsetid("", 17)])
    onnx.checker.check_model(model)
    path.write_bytes(model.SerializeToString())
    return path


def amount_events(*amounts: Any) -> list[Event]:
    return [Event(id=f"e-{i}", source="/s", type="t", time=T0, data={"amount": a}) for i, a in enumerate(amounts)]


def test_scores_are_clipped_and_nan_is_a_contract_error(tmp_path: Path) -> None:
    spec = [FEATURES[0]]
    ident = create("raw", {"path": str(graph_model(tmp_path / "id.onnx", "Identity")), "features": spec,
                           "output": {"kind": "score"}}, ScoringSettings())
    assert scores(ident.score_batch(amount_events("0.25", 7, -3))).tolist() == [0.25, 1.0, 0.0]
    log = create("log", {"path": str(graph_model(tmp_path / "log.onnx", "Log")), "features": spec,
                         "output": {"kind": "score"}}, ScoringSettings())
    assert log.score_batch(amount_events(1))[0].score == 0.0
    with pytest.raises(ContractError, match=r"NaN score for event e-1"):
        log.score_batch(amount_events(1, -1))  # log(-1) is NaN


def test_symbolic_input_width_is_checked_by_a_trial_run(tmp_path: Path) -> None:
    path = graph_model(tmp_path / "id.onnx", "Identity", width="w")  # accepts any width, returns it unchanged
    with pytest.raises(ConfigurationError, match=r"options\.output\.kind: output 'y' gives \(1, 2\) per event"):
        create("m", {"path": str(path), "features": FEATURES[:2], "output": {"kind": "score"}}, ScoringSettings())
    assert create("m", {"path": str(path), "features": FEATURES[:1], "output": {"kind": "score"}}, ScoringSettings())


def test_scoring_is_thread_safe(training: Any, tmp_path: Path) -> None:
    events, matrix, labels = training
    s = scorer(save(LogisticRegression(max_iter=500).fit(matrix, labels), tmp_path / "m.onnx", matrix.shape[1]))
    expected = scores(s.score_batch(events))
    out: dict[int, np.ndarray] = {}

    def work(k: int) -> None:
        out[k] = scores(s.score_batch(events[k * 50:(k + 1) * 50]))

    threads = [threading.Thread(target=work, args=(k,)) for k in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert np.array_equal(np.concatenate([out[k] for k in range(8)]), expected)


def test_registered_as_scorer_kind_onnx(training: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """pyproject declares the entry point, and the registry builds a configured ONNX model with it."""
    import tomllib
    from importlib.metadata import EntryPoint

    from gateway.scoring import registry

    pyproject = tomllib.loads((Path(__file__).parents[2] / "pyproject.toml").read_text())
    value = pyproject["project"]["entry-points"]["gateway.scorers"]["onnx"]
    ep = EntryPoint(name="onnx", value=value, group="gateway.scorers")
    assert ep.load() is create
    # The installed metadata may predate the entry point (editable installs); use pyproject's.
    monkeypatch.setattr(registry, "_entry_points", lambda: {"onnx": ep})
    events, matrix, labels = training
    model = LogisticRegression(max_iter=500).fit(matrix, labels)
    path = save(model, tmp_path / "m.onnx", matrix.shape[1])
    settings = ScoringSettings.model_validate(
        {"model": "fraud", "models": {"fraud": {"kind": "onnx", "options": {"path": str(path), "features": FEATURES}}}}
    )
    built = registry.build_scorer("fraud", settings)
    assert built.name == "fraud" and built.version == hashlib.sha256(path.read_bytes()).hexdigest()[:12]
    assert np.allclose(scores(built.score_batch(events[:20])), model.predict_proba(matrix[:20])[:, 1], atol=1e-5)


def test_default_probability_output_prefers_class_columns_over_a_float_label(tmp_path: Path) -> None:
    """A model whose first float output is a 1-D label: the default reads the (n, 2) probabilities."""
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 2])
    label = helper.make_tensor_value_info("label", TensorProto.FLOAT, ["batch"])
    proba = helper.make_tensor_value_info("proba", TensorProto.FLOAT, ["batch", 2])
    nodes = [
        helper.make_node("ArgMax", ["x"], ["idx"], axis=1, keepdims=0),
        helper.make_node("Cast", ["idx"], ["label"], to=TensorProto.FLOAT),
        helper.make_node("Softmax", ["x"], ["proba"], axis=1),
    ]
    model = helper.make_model(helper.make_graph(nodes, "g", [x], [label, proba]), opset_imports=[helper.make_opsetid("", 17)])
    path = tmp_path / "two.onnx"
    path.write_bytes(model.SerializeToString())
    spec = [{"name": "a", "path": "data.a", "type": "number"}, {"name": "b", "path": "data.b", "type": "number"}]
    s = create("m", {"path": str(path), "features": spec}, ScoringSettings())
    assert s._output_name == "proba"
    ev = [Event(id="e", source="/s", type="t", time=T0, data={"a": 0, "b": "1.5"})]
    assert s.score_batch(ev)[0].score == pytest.approx(1 / (1 + np.exp(-1.5)), abs=1e-6)
