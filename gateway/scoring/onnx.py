"""The ONNX scorer: a model file run by onnxruntime, fed by a configured feature spec.

Configured as ``scoring.models.<name>`` with ``scorer: onnx`` (entry point ``gateway.scorers``)::

    options:
      path: models/fraud.onnx
      features:                      # see gateway.scoring.extract
        - {name: amount, path: data.amount, type: number}
        - {name: country, path: data.customer.country, type: category,
           encoding: {one_hot: {categories: [DE, FR, US]}}}
      output: {name: output_probability, kind: probability, class_index: 1}

Everything that can be checked is checked when the scorer is created (file readable and loadable,
input name and type, the feature columns against the model's input width, the output and its
kind), by running the model once on a row of zeros; mistakes are :class:`ConfigurationError`
naming ``scoring.models.<name>.options.<field>``. The scorer keeps no state between batches and
onnxruntime's ``InferenceSession.run`` is thread-safe, so workers may share one instance.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Annotated, Any, Literal

import numpy as np
from pydantic import (
    BaseModel,
    ConfigDict,
    Discriminator,
    Field,
    Tag,
    ValidationError,
    model_validator,
)

from gateway.config import ScoringSettings
from gateway.errors import ConfigurationError, ContractError
from gateway.events import Event
from gateway.scoring.extract import FeatureExtractor, FeatureSpec, configuration_error
from gateway.scoring.protocols import ScoreResult

__all__ = ["MinMax", "MinMaxTransform", "OnnxOptions", "OnnxScorer", "OutputSpec", "create"]

_FLOAT_TENSORS = {"tensor(float)": np.float32, "tensor(double)": np.float64}
_EXPECTED_TYPE = {
    "probability": "seq(map(...)) or a float tensor", "label": "a numeric tensor", "score": "a float tensor"
}
_NUMERIC_TENSORS = {
    "tensor(float)", "tensor(double)", "tensor(float16)", "tensor(bool)",
    *(f"tensor({s}int{b})" for s in ("", "u") for b in (8, 16, 32, 64)),
}


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class MinMax(_Strict):
    """Linear map of ``min`` to 0 and ``max`` to 1 (``min > max`` inverts the scale)."""

    min: float = Field(allow_inf_nan=False, description="Raw value that maps to score 0.")
    max: float = Field(allow_inf_nan=False, description="Raw value that maps to score 1.")

    @model_validator(mode="after")
    def _distinct(self) -> MinMax:
        if self.min == self.max:
            raise ValueError("min and max must differ")
        return self


class MinMaxTransform(_Strict):
    """``transform: {minmax: {min: ..., max: ...}}``."""

    minmax: MinMax = Field(description="The raw values mapped to 0 and 1; results are clipped to [0, 1].")


def _transform_branch(value: Any) -> str:
    return "[name]" if isinstance(value, str) else "[minmax]"


#: ``identity``, ``sigmoid`` or ``{minmax: {min, max}}``; the tags keep pydantic from reporting a
#: mistake against both branches (and are dropped from option paths in error messages).
Transform = Annotated[
    Annotated[Literal["identity", "sigmoid"], Tag("[name]")] | Annotated[MinMaxTransform, Tag("[minmax]")],
    Discriminator(_transform_branch),
]


class OutputSpec(_Strict):
    """Which model output gives the score, and how."""

    name: str | None = Field(
        None,
        description="Output name; default: the first output whose type fits the kind, for probability "
        "preferring a ZipMap or an (n, classes) tensor (see docs/scoring.md).",
    )
    kind: Literal["probability", "label", "score"] = Field(
        "probability",
        description="probability: class probabilities (a ZipMap list of dicts or an (n, classes) tensor), "
        "class_index picks the positive class; label: a numeric predicted label; score: one number per event.",
    )
    class_index: int = Field(
        1, ge=0, description="For probability outputs: the column of the positive class (sorted class order)."
    )
    transform: Transform = Field(
        "identity", description="Maps the raw value into [0, 1]: identity, sigmoid or {minmax: {min, max}}."
    )


class OnnxOptions(_Strict):
    """``scoring.models.<name>.options`` of an ONNX scorer."""

    path: str = Field(min_length=1, description="The .onnx model file.")
    features: list[FeatureSpec] = Field(min_length=1, description="Feature spec: event fields -> input columns.")
    input: str | None = Field(None, description="Model input fed with the feature matrix; default: the first input.")
    output: OutputSpec = Field(default_factory=lambda: OutputSpec.model_validate({}), description="Output mapping to the score.")
    intra_op_threads: int = Field(1, ge=1, le=256, description="onnxruntime threads per model call.")


def _import_onnxruntime(where: str) -> Any:
    try:
        import onnxruntime
    except ImportError as exc:
        raise ConfigurationError(
            f"{where}: the ONNX scorer needs onnxruntime; install it with pip install 'legacy-gateway[onnx]'"
        ) from exc
    return onnxruntime


def _fits(kind: str, onnx_type: str) -> bool:
    """Whether an output of ``onnx_type`` can carry a ``kind`` value."""
    if kind == "probability":
        return onnx_type.startswith("seq(map(") or onnx_type in _FLOAT_TENSORS
    if kind == "label":
        return onnx_type in _NUMERIC_TENSORS
    return onnx_type in _FLOAT_TENSORS


def _json_float(value: float) -> float | None:
    return value if math.isfinite(value) else None


class OnnxScorer:
    """Scores events with an ONNX model (onnxruntime, CPU).

    Attributes:
        name: the configured model name.
        version: the first 12 hex digits of the SHA-256 of the model file (a new file is a new
            version; the feature spec is not part of it).
        extractor: the feature extractor feeding the model.
    """

    def __init__(
        self,
        name: str,
        path: str | Path,
        features: Sequence[FeatureSpec] | FeatureExtractor,
        *,
        input: str | None = None,
        output: OutputSpec | None = None,
        intra_op_threads: int = 1,
        where: str | None = None,
    ) -> None:
        """Load and check the model.

        Args:
            name: model name (stored with every score).
            path: the ``.onnx`` file; read once, so the version always matches the loaded model.
            features: the feature spec or a ready extractor.
            input: model input to feed; default: the first input.
            output: output mapping; default: :class:`OutputSpec` defaults.
            intra_op_threads: onnxruntime intra-op threads (one per call is right for micro-batches
                with several workers; raise it for large batches on a dedicated core set).
            where: option path for error messages; default ``scoring.models.<name>.options``.

        Raises:
            ConfigurationError: onnxruntime missing, file unreadable or not ONNX, unknown input or
                output, unsupported types, or feature columns that do not match the model input.
        """
        where = where or f"scoring.models.{name}.options"
        ort = _import_onnxruntime(where)
        self.name = name
        self.extractor = features if isinstance(features, FeatureExtractor) else FeatureExtractor(list(features))
        self._output = output or OutputSpec.model_validate({})
        try:
            blob = Path(path).read_bytes()
        except OSError as exc:
            raise ConfigurationError(
                f"{where}.path: cannot read the model file {str(path)!r}: {exc.strerror or exc}"
            ) from exc
        self.version = hashlib.sha256(blob).hexdigest()[:12]
        self.path = str(path)
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = intra_op_threads
        opts.inter_op_num_threads = 1
        opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        opts.log_severity_level = 3  # errors only: onnxruntime's warnings are not actionable for operators
        try:
            self._session = ort.InferenceSession(blob, sess_options=opts, providers=["CPUExecutionProvider"])
        except Exception as exc:  # onnxruntime raises its own pybind exception classes
            raise ConfigurationError(
                f"{where}.path: {str(path)!r} is not a loadable ONNX model: {str(exc).splitlines()[0][:200]}"
            ) from exc
        self._input, self._dtype = self._resolve_input(input, where)
        self._output_name = self._resolve_output(where)
        self._trial(where)

    def _resolve_input(self, name: str | None, where: str) -> tuple[str, Any]:
        inputs = self._session.get_inputs()
        names = [i.name for i in inputs]
        chosen = next((i for i in inputs if i.name == (name or names[0])), None)
        if chosen is None:
            raise ConfigurationError(
                f"{where}.input: the model has no input {name!r}; expected one of: {', '.join(names)}"
            )
        if len(inputs) > 1:
            raise ConfigurationError(
                f"{where}.input: the model has {len(inputs)} inputs ({', '.join(names)}); the ONNX scorer feeds "
                "exactly one 2-D float tensor (export the model with a single input)"
            )
        if chosen.type not in _FLOAT_TENSORS:
            raise ConfigurationError(
                f"{where}.input: input {chosen.name!r} is a {chosen.type}; expected tensor(float) or tensor(double)"
            )
        shape = list(chosen.shape or [])
        if len(shape) != 2:
            raise ConfigurationError(
                f"{where}.input: input {chosen.name!r} has shape {shape}; expected 2-D (batch, columns)"
            )
        if isinstance(shape[1], int) and shape[1] != self.extractor.width:
            raise ConfigurationError(self._width_message(where, chosen.name, shape[1]))
        return chosen.name, _FLOAT_TENSORS[chosen.type]

    def _width_message(self, where: str, input_name: str, expected: Any) -> str:
        cols = ", ".join(self.extractor.columns)
        cols = cols if len(cols) <= 300 else cols[:297] + "..."
        return (
            f"{where}.features: the features give {self.extractor.width} columns ({cols}) but the model input "
            f"{input_name!r} expects {expected}; the feature spec must produce exactly the columns the model "
            "was trained on"
        )

    def _resolve_output(self, where: str) -> str:
        outputs = self._session.get_outputs()
        kind, name = self._output.kind, self._output.name
        if name is None:
            fitting = [o for o in outputs if _fits(kind, o.type)]
            if kind == "probability":
                # Prefer (n, classes) over (n,): a 1-D float output next to a 2-D one is a label.
                fitting.sort(key=lambda o: not (o.type.startswith("seq(") or len(o.shape or []) == 2))
            chosen = fitting[0] if fitting else None
            if chosen is None:
                types = ", ".join(f"{o.name} ({o.type})" for o in outputs)
                raise ConfigurationError(f"{where}.output.name: no output of the model fits kind {kind!r}: {types}")
            return str(chosen.name)
        named = next((o for o in outputs if o.name == name), None)
        if named is None:
            raise ConfigurationError(
                f"{where}.output.name: the model has no output {name!r}; expected one of: "
                + ", ".join(o.name for o in outputs)
            )
        if not _fits(kind, named.type):
            raise ConfigurationError(
                f"{where}.output.kind: output {name!r} is a {named.type}, which cannot carry a {kind}; expected "
                + _EXPECTED_TYPE[kind]
            )
        return name

    def _trial(self, where: str) -> None:
        """Run one row of zeros: proves the width (when the model's is symbolic) and the output shape."""
        try:
            raw = self._run(np.zeros((1, self.extractor.width), dtype=np.float32))
        except Exception as exc:
            raise ConfigurationError(
                self._width_message(where, self._input, "a different width")
                + f" (onnxruntime: {str(exc).splitlines()[0][:200]})"
            ) from exc
        if self._output.kind == "probability":
            classes = len(raw[0]) if isinstance(raw, list) else (1 if raw.ndim == 1 else raw.shape[1])
            if classes > 1 and self._output.class_index >= classes:
                raise ConfigurationError(
                    f"{where}.output.class_index: {self._output.class_index} is out of range; the model gives "
                    f"{classes} class probabilities (0..{classes - 1})"
                )
        elif not isinstance(raw, np.ndarray) or raw.size != 1:
            raise ConfigurationError(
                f"{where}.output.kind: output {self._output_name!r} gives {getattr(raw, 'shape', type(raw).__name__)} "
                f"per event; a {self._output.kind} output must give exactly one number per event"
            )

    def _run(self, matrix: np.ndarray) -> Any:
        return self._session.run([self._output_name], {self._input: matrix.astype(self._dtype, copy=False)})[0]

    def _raw_values(self, raw: Any, n: int) -> tuple[list[float], list[Any]]:
        """Per event: the value the score comes from, and the raw output for the explanation."""
        index = self._output.class_index
        if isinstance(raw, list):  # ZipMap: one {class label: probability} per event
            if len(raw) != n:
                raise ContractError(f"model {self.name}: {len(raw)} outputs for {n} events")
            # ZipMap keys are the class labels; sorted, they are in sklearn's classes_ order (the
            # order of the probability tensor a zipmap=False export gives).
            key = sorted(raw[0])[index] if raw else None
            values = [float(d[key]) for d in raw]
            return values, [{str(k): _json_float(float(v)) for k, v in d.items()} for d in raw]
        arr = np.asarray(raw)
        if arr.shape[0] != n:
            raise ContractError(f"model {self.name}: {arr.shape[0]} outputs for {n} events")
        arr = arr.reshape(n, -1)
        if arr.shape[1] == 1:
            col = arr[:, 0].astype(np.float64)
            return col.tolist(), [_json_float(v) if isinstance(v, float) else v for v in arr[:, 0].tolist()]
        col = arr[:, index].astype(np.float64)
        return col.tolist(), [[_json_float(float(v)) for v in row] for row in arr.tolist()]

    def _transform(self, x: float) -> float:
        t = self._output.transform
        if t == "sigmoid":
            return 1.0 / (1.0 + math.exp(-x)) if x >= 0 else math.exp(x) / (1.0 + math.exp(x))
        if isinstance(t, MinMaxTransform):
            return (x - t.minmax.min) / (t.minmax.max - t.minmax.min)
        return x

    def score_batch(self, events: Sequence[Event]) -> list[ScoreResult]:
        """Score ``events``; one result per event, in order.

        Each explanation holds ``features`` (name -> the value used), ``output`` (the output name)
        and ``raw`` (that output's value for the event: the class probabilities, the label or the
        raw score, before the transform).

        Raises:
            ContractError: an event lacks a feature without default or has a value of the wrong
                type (message names the event id and path), or the model answered NaN or the wrong
                number of rows.
        """
        if not events:
            return []
        extraction = self.extractor.extract(events)
        values, raws = self._raw_values(self._run(extraction.matrix), len(events))
        results = []
        for event, value, raw, feats in zip(events, values, raws, extraction.values):
            score = self._transform(value)
            if math.isnan(score):
                raise ContractError(f"model {self.name}: NaN score for event {event.id}")
            explanation = {"features": feats, "output": self._output_name, "raw": raw}
            results.append(ScoreResult(min(1.0, max(0.0, score)), explanation))
        return results


def create(name: str, options: dict[str, Any], settings: ScoringSettings) -> OnnxScorer:
    """Factory of the ``onnx`` scorer (entry point group ``gateway.scorers``).

    Args:
        name: the model's name (``scoring.models.<name>``).
        options: ``scoring.models.<name>.options``, validated as :class:`OnnxOptions`.
        settings: the scoring settings (unused; part of the factory contract).

    Returns:
        A ready scorer; the model is loaded and checked.

    Raises:
        ConfigurationError: bad options (naming ``scoring.models.<name>.options.<field>``), or a
            model that cannot be loaded or does not match the feature spec.
    """
    where = f"scoring.models.{name}.options"
    try:
        opts = OnnxOptions.model_validate(options)
    except ValidationError as exc:
        raise configuration_error(where, exc, OnnxOptions) from None
    try:
        extractor = FeatureExtractor(opts.features)
    except ConfigurationError as exc:
        raise ConfigurationError(f"{where}.features: {exc}") from None
    return OnnxScorer(
        name, opts.path, extractor, input=opts.input, output=opts.output,
        intra_op_threads=opts.intra_op_threads, where=where,
    )
