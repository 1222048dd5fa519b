"""Accuracy from ground truth fed back later: ``POST /feedback`` on the sidecar.

Request records carry no labels, so accuracy needs the truth to come back. The sidecar
remembers the predictions of recently *sampled* requests (the ones whose outputs it
received), keyed by the request's OIP ``id`` and by its trace id, and a later feedback
document names the request and its true label(s)::

    POST /feedback
    {"model": "breast_cancer", "request_id": "r-17", "labels": [1, 0]}
    {"model": "breast_cancer", "trace_id": "4bf92f3577b34da6a3ce929d0e0e4736", "labels": 1}
    or a list of such documents

A request's prediction per row is taken from one output tensor: ``prediction_outputs``
names it per model, else the first output. An output with one value per row is the
prediction itself (a class label); one with several values per row is read as class scores
and its argmax is the prediction. A row is correct when prediction and label are equal (as
numbers, or as text when either is not a number). Accuracy is counted per (model, version)
since start; feedback for requests no longer (or never) remembered is counted as unmatched.

Regression models are scored by their errors instead: the mean absolute error and the root
mean squared error of the labelled rows, per (model, version), over the same bounded window
(the predictions of the last ``capacity`` sampled requests are what labels can join; the
errors accumulate since start, like accuracy). A model is regression when ``tasks`` says so
(``{model: "regression"}``; ``"classification"`` forces accuracy). Otherwise it is inferred
per feedback document: regression when the prediction output is floating point with one
value per row, every label is a number, and either some label is written as a float
(``2.5``, ``3.0``) or some prediction is not a whole number; classification otherwise. Once
a version has been scored as regression it stays so (integer labels such as ``3`` included).
"""

from __future__ import annotations

import math
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import numpy.typing as npt

from turnout_contract.records import RecordBatch

__all__ = ["Accuracy", "Errors", "PredictionLog", "Reward", "Task"]

Task = Literal["classification", "regression"]


@dataclass(eq=False)
class Accuracy:
    labelled: int = 0
    correct: int = 0

    @property
    def ratio(self) -> float | None:
        return self.correct / self.labelled if self.labelled else None


@dataclass(eq=False)
class Reward:
    """Numeric rewards fed back for a version's requests (A/B experiments): their sums."""

    n: int = 0
    total: float = 0.0
    squares: float = 0.0

    def public(self) -> dict[str, Any]:
        mean = self.total / self.n if self.n else None
        variance = (
            max(self.squares / self.n - (self.total / self.n) ** 2, 0.0) * self.n / (self.n - 1)
            if self.n > 1
            else None
        )
        return {"n": self.n, "mean": mean, "variance": variance}


@dataclass(eq=False)
class Errors:
    """Regression errors of the labelled rows: sums of absolute and squared errors."""

    labelled: int = 0
    absolute: float = 0.0
    squared: float = 0.0

    @property
    def mae(self) -> float | None:
        return self.absolute / self.labelled if self.labelled else None

    @property
    def rmse(self) -> float | None:
        return math.sqrt(self.squared / self.labelled) if self.labelled else None


def _predictions(output: npt.NDArray[Any]) -> tuple[list[Any], bool]:
    """The prediction per row, and whether they are real values (float, one per row)."""
    values = np.asarray(output)
    real = values.dtype.kind == "f"
    if values.ndim <= 1:
        return list(values.tolist()), real
    flat = values.reshape(values.shape[0], -1)
    if flat.shape[1] == 1:
        return list(flat[:, 0].tolist()), real
    return list(np.argmax(flat, axis=1).tolist()), False


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _same(prediction: Any, label: Any) -> bool:
    if isinstance(prediction, bytes):
        prediction = prediction.decode("utf-8", "replace")
    try:
        return float(prediction) == float(label)
    except (TypeError, ValueError):
        return str(prediction) == str(label)


@dataclass(eq=False)
class _Entry:
    version: int
    predictions: list[Any]
    real: bool = False  # float predictions, one per row: may be a regression
    scored: bool = False


class PredictionLog:
    """The predictions of the most recent ``capacity`` sampled requests, and accuracy."""

    def __init__(
        self,
        capacity: int,
        prediction_outputs: dict[str, str],
        tasks: dict[str, Task] | None = None,
    ) -> None:
        self.capacity = capacity
        self.prediction_outputs = prediction_outputs
        self.tasks: dict[str, Task] = dict(tasks or {})
        self._entries: OrderedDict[tuple[str, str], _Entry] = OrderedDict()
        self.accuracy: dict[tuple[str, int], Accuracy] = {}
        self.rewards: dict[tuple[str, int], Reward] = {}
        self.errors: dict[tuple[str, int], Errors] = {}
        self.unmatched = 0

    def remember(self, batch: RecordBatch) -> None:
        if not batch.outputs or batch.sampled.size == 0 or self.capacity == 0:
            return
        name = self.prediction_outputs.get(batch.model) or next(iter(batch.outputs))
        output = batch.outputs.get(name)
        if output is None or len(output) != batch.sampled.size:
            return
        predicted, real = _predictions(output)
        if self.tasks.get(batch.model) == "regression" and not real:
            if np.asarray(output).reshape(len(output), -1).shape[1] != 1:
                return  # a regression needs one value per row
            try:
                predicted, real = [float(p) for p in predicted], True
            except (TypeError, ValueError):
                return  # not numbers
        rows: dict[int, list[Any]] = {}
        for index, prediction in zip(batch.sampled.tolist(), predicted, strict=True):
            rows.setdefault(index, []).append(prediction)
        for index, predictions in rows.items():
            entry = _Entry(batch.version, predictions, real)
            for key in (batch.columns["request_id"][index], batch.columns["trace_id"][index]):
                if key:
                    self._entries[(batch.model, key)] = entry
                    self._entries.move_to_end((batch.model, key))
        while len(self._entries) > self.capacity:
            self._entries.popitem(last=False)

    def feedback(self, document: dict[str, Any]) -> bool:
        """Score one feedback document; False when its request is not remembered."""
        model = str(document["model"])
        key = document.get("request_id") or document.get("trace_id")
        labels = document.get("labels", document.get("label"))
        reward = document.get("reward")
        if not key or (labels is None and reward is None):
            raise ValueError("feedback needs model, request_id or trace_id, and labels or reward")
        if reward is not None and (not _number(reward) or not math.isfinite(reward)):
            raise ValueError(f"request {key}: reward must be a finite number")
        entry = self._entries.get((model, str(key)))
        if entry is None or entry.scored:  # scored: through the request's other key
            self.unmatched += 1
            return False
        if labels is None:
            value = float(reward or 0.0)  # checked above: a finite number
            del self._entries[(model, str(key))]
            entry.scored = True
            rewards = self.rewards.setdefault((model, entry.version), Reward())
            rewards.n += 1
            rewards.total += value
            rewards.squares += value**2
            return True
        predictions = entry.predictions
        labels = labels if isinstance(labels, list) else [labels]
        if len(labels) != len(predictions):
            raise ValueError(
                f"request {key} had {len(predictions)} rows, feedback gives {len(labels)} labels"
            )
        regression = self._regression(model, entry, labels)
        if regression:
            for label in labels:
                if not _number(label) or not math.isfinite(label):
                    raise ValueError(f"request {key}: regression labels must be finite numbers")
        del self._entries[(model, str(key))]
        entry.scored = True
        if regression:
            errors = self.errors.setdefault((model, entry.version), Errors())
            for prediction, label in zip(predictions, labels, strict=True):
                error = float(prediction) - float(label)
                errors.labelled += 1
                errors.absolute += abs(error)
                errors.squared += error * error
            return True
        accuracy = self.accuracy.setdefault((model, entry.version), Accuracy())
        accuracy.labelled += len(labels)
        accuracy.correct += sum(_same(p, t) for p, t in zip(predictions, labels, strict=True))
        return True

    def _regression(self, model: str, entry: _Entry, labels: list[Any]) -> bool:
        task = self.tasks.get(model)
        if task is not None:
            return task == "regression"
        if not entry.real or not all(_number(label) for label in labels):
            return False
        if (model, entry.version) in self.errors:
            return True
        return any(isinstance(label, float) for label in labels) or any(
            not float(p).is_integer() for p in entry.predictions if math.isfinite(float(p))
        )
