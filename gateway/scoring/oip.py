"""A remote scorer speaking the Open Inference Protocol v2 over HTTP (KServe, Triton, MLServer).

Entry point ``oip`` in the ``gateway.scorers`` group; :func:`create` is the factory. One micro-batch
becomes one request per ``max_batch`` events::

    POST <url>/v2/models/<model>[/versions/<model_version>]/infer
    {"inputs": [{"name": "input-0", "shape": [n, width], "datatype": "FP32", "data": [...]}]}

``data`` is the batch's feature matrix (:class:`gateway.scoring.extract.FeatureExtractor`, the same
feature spec as for ONNX models), flattened in row-major order (the spec allows flat or nested
data). The answer's output tensor (by name, else the first) gives one value per event, or one row
per event (``[n, k]``: ``output.class_index`` picks the column); ``output.transform`` maps it to a
score, clipped to [0, 1].

Resilience: the scoring worker already wraps every call as ``Retry(Breaker(Timeout(call)))`` with
delayed retries through TTL queues, so this scorer only retries a *connection hiccup* in process
(refused, reset, or a pooled keep-alive connection the server closed: 2 attempts within about a
second, under the retry budget ``oip:<url>``) and otherwise raises a classified error at once
(:func:`gateway.scoring.errors.classify_http_error`): timeouts and 5xx are ``TransientError`` (the
breaker counts them), 429 a ``BackpressureError`` with ``retry_after``, a malformed answer a
``ContractError`` (dead-lettered, counts as an answer), 401/403 a ``ConfigurationError``.

Secrets: the URL's user info becomes HTTP basic auth and is never part of a URL this module logs,
names a downstream with, or puts into an error; header values are ``SecretStr`` and never logged.
"""

from __future__ import annotations

import json
import logging
import math
import re
from collections.abc import Sequence
from typing import Any, Literal
from urllib.parse import quote

import httpx
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    ValidationError,
    field_validator,
)
from tenacity import Retrying, retry_if_exception

from gateway.config import ScoringSettings
from gateway.errors import (
    ConfigurationError,
    ContractError,
    GatewayError,
    TransientError,
)
from gateway.events import Event, jsonable
from gateway.resilience.budget import RetryBudget
from gateway.resilience.retry import RetryPolicy, retrying
from gateway.scoring.errors import classify_http_error
from gateway.scoring.extract import FeatureExtractor, FeatureSpec
from gateway.scoring.protocols import ScoreResult

__all__ = ["OipOptions", "OipScorer", "OutputSpec", "create"]

log = logging.getLogger(__name__)

#: httpx errors that mean "the connection broke before any answer": retried once in process.
#: Timeouts and HTTP statuses are not: they are the breaker's and the delayed retry's business.
_HICCUPS = (httpx.NetworkError, httpx.RemoteProtocolError)
_HEADER_NAME = re.compile(r"^[!#$%&'*+.^_`|~0-9A-Za-z-]+$")
_MAX_NESTING = 8  # depth of nested tensor data accepted in an answer


class OutputSpec(BaseModel):
    """Which output tensor gives the score, and how."""

    model_config = ConfigDict(extra="forbid")

    name: str | None = Field(None, min_length=1, description="Output tensor name; default: the first output.")
    class_index: int | None = Field(None, ge=0, description="Column of a 2-D output [n, k] (e.g. 1 for the "
                                    "positive class of predict_proba); required when k > 1.")
    transform: Literal["identity", "sigmoid"] = Field("identity", description="identity (the value is a "
                                                      "probability) or sigmoid (the value is a logit).")


class OipOptions(BaseModel):
    """Options of an ``oip`` scorer (``scoring.models.<name>.options``)."""

    model_config = ConfigDict(extra="forbid")

    url: SecretStr = Field(..., description="Base URL of the inference server (http or https), e.g. "
                           "http://fraud.models.svc; user info (https://user:${PW}@host) becomes basic auth.")
    model: str = Field(..., min_length=1, description="Model name on the server.")
    model_version: str | None = Field(None, min_length=1, description="Model version; default: the server's choice.")
    timeout: float = Field(5.0, gt=0, le=600, description="Seconds for each of connect, send, wait and read.")
    max_batch: int = Field(64, ge=1, le=100_000, description="Most events per request; larger batches are split.")
    max_connections: int = Field(8, ge=1, le=1000, description="Connection pool size (kept alive).")
    retry_attempts: int = Field(2, ge=1, le=5, description="In-process attempts for a connection hiccup "
                                "(refused, reset); timeouts and HTTP errors are left to the worker's breaker and retry.")
    headers: dict[str, SecretStr] = Field(default_factory=dict, description="Extra request headers, e.g. "
                                          "Authorization: 'Bearer ${MODEL_TOKEN}'; values are secrets, never logged.")
    features: list[FeatureSpec] = Field(..., min_length=1, description="The input columns, in the model's order "
                                        "(the feature spec of gateway.scoring.extract, as for ONNX models).")
    input_name: str = Field("input-0", min_length=1, description="Name of the input tensor.")
    datatype: Literal["FP32", "FP64"] = Field("FP32", description="Datatype of the input tensor (the values "
                                              "are those of the extractor's float32 matrix either way).")
    output: OutputSpec = Field(default_factory=lambda: OutputSpec.model_validate({}), description="Where the score is in the answer.")
    check_on_start: bool = Field(True, description="Read the model metadata at start: the model must exist and "
                                 "its input width match the features (else a configuration error).")

    @field_validator("url")
    @classmethod
    def _http_url(cls, value: SecretStr) -> SecretStr:
        try:
            url = httpx.URL(value.get_secret_value())
        except (httpx.InvalidURL, TypeError):
            raise ValueError("not a valid URL") from None
        if url.scheme not in ("http", "https") or not url.host:
            raise ValueError("must be an http:// or https:// URL with a host")
        if url.query or url.fragment:
            raise ValueError("must not have a query or fragment")
        return value

    @field_validator("headers")
    @classmethod
    def _header_names(cls, value: dict[str, SecretStr]) -> dict[str, SecretStr]:
        for key, secret in value.items():
            if not _HEADER_NAME.match(key):
                raise ValueError(f"invalid header name {key!r}")
            if any(c in secret.get_secret_value() for c in "\r\n"):
                raise ValueError(f"the value of header {key!r} contains a line break")
        return value


class OipScorer:
    """Scores events with a model on an OIP v2 inference server.

    Args:
        name: the configured model name (``scorer:<name>`` is its breaker).
        options: validated options.
        budget: retry budget of the downstream ``oip:<url>`` (default: a new one); pass the
            process registry's ``budget(...)`` to share it.

    Raises:
        ConfigurationError: with ``check_on_start``, the model does not exist, the credentials are
            refused, or the metadata contradicts the options.
        TransientError: with ``check_on_start``, the server could not be reached.
    """

    def __init__(
        self,
        name: str,
        options: OipOptions,
        *,
        budget: RetryBudget | None = None,
    ) -> None:
        self.name = name
        self.options = options
        url = httpx.URL(options.url.get_secret_value())
        auth = httpx.BasicAuth(url.username, url.password) if url.username or url.password else None
        self.url = str(url.copy_with(username=None, password=None)).rstrip("/")  #: the URL without credentials
        path = f"/v2/models/{quote(options.model, safe='')}"
        if options.model_version:
            path += f"/versions/{quote(options.model_version, safe='')}"
        self._model_path = self.url + path
        self._context = f"OIP model {options.model!r} at {self.url}"
        try:
            self.extractor = FeatureExtractor(options.features)
        except ConfigurationError as exc:
            raise ConfigurationError(f"scoring.models.{name}.options.features: {exc}") from None
        self._width = self.extractor.width
        self._policy = RetryPolicy(attempts=options.retry_attempts, base_delay=0.05, max_delay=0.25,
                                   deadline=min(1.0, options.timeout))
        self.budget = budget if budget is not None else RetryBudget(f"oip:{self.url}")
        self._client = httpx.Client(
            auth=auth,
            headers={k: v.get_secret_value() for k, v in options.headers.items()},
            timeout=httpx.Timeout(options.timeout),
            limits=httpx.Limits(max_connections=options.max_connections,
                                max_keepalive_connections=options.max_connections),
        )
        self.version = options.model_version or "remote"
        if options.check_on_start:
            try:
                self.version = self._check_metadata()
            except BaseException:
                self._client.close()
                raise
        log.info("OIP scorer %r: model %r version %s at %s, %d features",
                 name, options.model, self.version, self.url, self._width)

    def __repr__(self) -> str:
        return f"OipScorer({self.name!r}, model={self.options.model!r}, url={self.url!r})"

    # ------------------------------------------------------------------ the Scorer protocol
    def score_batch(self, events: Sequence[Event]) -> list[ScoreResult]:
        """Score ``events``, one request per ``max_batch`` of them.

        Raises:
            ContractError: an event lacks a feature without default, or the answer is malformed.
            TransientError: timeout, connection failure, 5xx (``BackpressureError`` for 429).
            ConfigurationError: HTTP 401/403.
            PermanentError: any other refused request.
        """
        out: list[ScoreResult] = []
        step = self.options.max_batch
        for start in range(0, len(events), step):
            chunk = events[start:start + step]
            extraction = self.extractor.extract(chunk)  # ContractError names the event and the feature
            answer = self._request("POST", self._model_path + "/infer", json=self._body(extraction.matrix.tolist()))
            output, raws = self._raw_outputs(answer, len(chunk))
            for ev, values, raw in zip(chunk, extraction.values, raws):
                explanation = {"features": values, "output": output, "raw": jsonable(raw)}
                out.append(ScoreResult(self._score(raw, ev), explanation))
        return out

    def close(self) -> None:
        """Close the connection pool."""
        self._client.close()

    # ------------------------------------------------------------------ request and answer
    def _body(self, rows: list[list[float]]) -> dict[str, Any]:
        body: dict[str, Any] = {"inputs": [{
            "name": self.options.input_name,
            "shape": [len(rows), self._width],
            "datatype": self.options.datatype,
            "data": [x for row in rows for x in row],  # row-major, flat
        }]}
        if self.options.output.name:
            body["outputs"] = [{"name": self.options.output.name}]
        return body

    def _raw_outputs(self, answer: Any, n: int) -> tuple[str, list[Any]]:
        """The output's name and one raw value (a row, with ``class_index``) per event."""
        outputs = answer.get("outputs") if isinstance(answer, dict) else None
        if not isinstance(outputs, list) or not outputs:
            raise ContractError(f"{self._context}: the answer has no outputs")
        wanted = self.options.output.name
        tensor = next((o for o in outputs if isinstance(o, dict) and o.get("name") == wanted), None) \
            if wanted else outputs[0]
        if not isinstance(tensor, dict):
            raise ContractError(f"{self._context}: the answer has no output {wanted or 0!r}")
        flat = _flatten(tensor.get("data"), self._context)
        shape = tensor.get("shape")
        if shape is not None:
            if not (isinstance(shape, list) and shape and all(type(d) is int and d >= 0 for d in shape)):
                raise ContractError(f"{self._context}: output shape {shape!r} is not a list of sizes")
            if math.prod(shape) != len(flat) or shape[0] != n:
                raise ContractError(f"{self._context}: output shape {shape} with {len(flat)} values "
                                    f"does not fit {n} events")
        if not flat or len(flat) % n:
            raise ContractError(f"{self._context}: {len(flat)} output values for {n} events")
        width = len(flat) // n
        name = str(tensor.get("name", ""))
        index = self.options.output.class_index
        if index is None:
            if width != 1:
                raise ContractError(f"{self._context}: {width} output values per event: set output.class_index")
            return name, flat
        if index >= width:
            raise ContractError(f"{self._context}: output.class_index {index} but {width} values per event")
        return name, [flat[i * width:(i + 1) * width] for i in range(n)]

    def _score(self, raw: Any, event: Event) -> float:
        index = self.options.output.class_index
        value = raw if index is None else raw[index]
        if math.isnan(value):
            raise ContractError(f"{self._context}: NaN output for event {event.id}")
        if self.options.output.transform == "sigmoid":
            value = 1.0 / (1.0 + math.exp(-value)) if value >= 0 else math.exp(value) / (1.0 + math.exp(value))
        return min(1.0, max(0.0, float(value)))

    def _request(self, method: str, url: str, **kwargs: Any) -> Any:
        """One HTTP call, its JSON answer; connection hiccups retried (budgeted), errors classified."""
        for attempt in self._retrying():
            with attempt:
                try:
                    response = self._client.request(method, url, **kwargs)
                    response.raise_for_status()
                    return response.json()
                except UnicodeDecodeError:
                    raise ContractError(f"{self._context}: the answer is not valid JSON (bad encoding)") from None
                except (httpx.HTTPError, json.JSONDecodeError) as exc:
                    raise classify_http_error(exc, self._context) from exc
        raise AssertionError("unreachable: retrying re-raises the last error")  # pragma: no cover

    def _retrying(self) -> Retrying:
        # retrying() allows every TransientError; narrowed here to connection hiccups. A new object
        # per call: several workers may share this scorer, and a Retrying serves one thread.
        return retrying(self._policy, budget=self.budget).copy(
            retry=retry_if_exception(lambda e: isinstance(e, TransientError) and isinstance(e.__cause__, _HICCUPS))
        )

    # ------------------------------------------------------------------ start-up check
    def _check_metadata(self) -> str:
        """Read the model metadata; check the input and output against the options; the version."""
        where = f"scoring.models.{self.name}.options"
        try:
            meta = self._request("GET", self._model_path)
        except ConfigurationError as exc:
            raise ConfigurationError(f"{where}.headers: {exc}") from exc
        except TransientError as exc:
            raise TransientError(f"{exc} (checking the model at start; check_on_start: false skips it)") from exc
        except GatewayError as exc:
            status = exc.__cause__.response.status_code if isinstance(exc.__cause__, httpx.HTTPStatusError) else None
            what = f"model {self.options.model!r}" + (f" version {self.options.model_version!r}"
                                                      if self.options.model_version else "")
            if status is not None:
                raise ConfigurationError(f"{where}.model: {what} not found at {self.url} (HTTP {status})") from exc
            raise ConfigurationError(f"{where}.url: {self.url} does not answer like an OIP v2 server: {exc}") from exc
        if not isinstance(meta, dict):
            raise ConfigurationError(f"{where}.url: {self.url} does not answer like an OIP v2 server")
        self._check_input(meta.get("inputs"), where)
        self._check_output(meta.get("outputs"), where)
        versions = meta.get("versions")
        if self.options.model_version:
            return self.options.model_version
        if isinstance(versions, list) and len(versions) == 1 and isinstance(versions[0], str):
            return versions[0]
        if isinstance(meta.get("version"), str) and meta["version"]:  # some servers say it this way
            return str(meta["version"])
        if isinstance(versions, list) and len(versions) > 1:
            log.warning("%s offers versions %s: set model_version to pin one (scores are tagged 'remote')",
                        self._context, versions[:10])
        return "remote"

    def _check_input(self, inputs: Any, where: str) -> None:
        if not isinstance(inputs, list) or not inputs:
            return
        by_name = {t.get("name"): t for t in inputs if isinstance(t, dict)}
        tensor = by_name.get(self.options.input_name)
        if tensor is None:
            raise ConfigurationError(f"{where}.input_name: the model has no input {self.options.input_name!r} "
                                     f"(inputs: {', '.join(map(str, by_name))})")
        shape = tensor.get("shape")
        if isinstance(shape, list) and len(shape) >= 2 and isinstance(shape[-1], int) and shape[-1] > 0 \
                and shape[-1] != self._width:
            raise ConfigurationError(f"{where}.features: the features give {self._width} columns "
                                     f"({', '.join(self.extractor.columns)}), but the model's input "
                                     f"{self.options.input_name!r} has shape {shape} ({shape[-1]} per event)")
        datatype = tensor.get("datatype")
        if isinstance(datatype, str) and datatype != self.options.datatype:
            hint = f" (set datatype: {datatype})" if datatype in ("FP32", "FP64") else " (FP32 and FP64 are supported)"
            raise ConfigurationError(f"{where}.datatype: the model's input {self.options.input_name!r} is "
                                     f"{datatype}, not {self.options.datatype}{hint}")

    def _check_output(self, outputs: Any, where: str) -> None:
        if not isinstance(outputs, list) or not outputs:
            return
        out = self.options.output
        tensors = [t for t in outputs if isinstance(t, dict)]
        tensor: dict[str, Any] | None = next((t for t in tensors if t.get("name") == out.name), None) \
            if out.name else (tensors[0] if tensors else None)
        if tensor is None:
            raise ConfigurationError(f"{where}.output.name: the model has no output {out.name!r} "
                                     f"(outputs: {', '.join(str(t.get('name')) for t in tensors)})")
        shape = tensor.get("shape")
        if not (isinstance(shape, list) and len(shape) >= 2 and isinstance(shape[-1], int) and shape[-1] > 0):
            return
        width = shape[-1]
        if out.class_index is None and width > 1:
            raise ConfigurationError(f"{where}.output.class_index: required: output {tensor.get('name')!r} has "
                                     f"shape {shape} ({width} values per event)")
        if out.class_index is not None and out.class_index >= width:
            raise ConfigurationError(f"{where}.output.class_index: {out.class_index} is out of range: output "
                                     f"{tensor.get('name')!r} has shape {shape}")


def create(name: str, options: dict[str, Any], settings: ScoringSettings) -> OipScorer:
    """The ``oip`` scorer factory (entry point ``gateway.scorers``).

    Args:
        name: the configured model name.
        options: ``scoring.models.<name>.options``, validated by :class:`OipOptions`.
        settings: the scoring settings (``score_timeout`` bounds a call's attempts).

    Returns:
        The scorer, its model checked on the server unless ``check_on_start`` is false.

    Raises:
        ConfigurationError: invalid options (naming ``scoring.models.<name>.options.<field>``; values
            are never shown), or a failed start-up check.
        TransientError: the server could not be reached for the start-up check.
    """
    try:
        opts = OipOptions.model_validate(options)
    except ValidationError as exc:
        lines = [f"scoring.models.{name}.options{_loc(e['loc'])}: {e['msg']}" for e in exc.errors(include_url=False)]
        raise ConfigurationError("\n".join(lines)) from None  # from None: the cause would show the values
    if opts.timeout * opts.retry_attempts > settings.score_timeout:
        log.warning("scoring.models.%s.options: timeout %g s x %d attempts exceeds scoring.score_timeout "
                    "(%g s): the worker may give up on a call before it ends", name, opts.timeout,
                    opts.retry_attempts, settings.score_timeout)
    return OipScorer(name, opts)


# ---------------------------------------------------------------------- helpers
def _loc(loc: tuple[int | str, ...]) -> str:
    return "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in loc)


def _flatten(data: Any, context: str, depth: int = 0) -> list[float]:
    """Tensor data (flat or nested, row-major) as a flat list of floats."""
    if not isinstance(data, list) or depth > _MAX_NESTING:
        raise ContractError(f"{context}: output data is not a list of numbers")
    out: list[float] = []
    for item in data:
        if isinstance(item, list):
            out.extend(_flatten(item, context, depth + 1))
        elif isinstance(item, (int, float)) and not isinstance(item, bool):
            try:
                out.append(float(item))
            except OverflowError:
                raise ContractError(f"{context}: output value out of range") from None
        else:
            raise ContractError(f"{context}: output data holds a {type(item).__name__}, not a number")
    return out
