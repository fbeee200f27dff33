"""Evaluation metrics for text classification, as users of the transformers examples expect them.

`evaluate.load` of the GLUE metric (or of `accuracy` / `f1`) is tried first: it is what the transformers examples
use. `evaluate` fetches metric scripts from the Hub, so offline (no cached script) the same keys are computed by
scikit-learn instead. No metric is computed by hand here.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from transformers.utils import logging

logger = logging.get_logger(__name__)

__all__ = ["GLUE_METRIC_KEYS", "TaskMetrics", "build_compute_metrics", "metric_keys"]

# The keys `evaluate.load("glue", task)` returns, per GLUE task.
GLUE_METRIC_KEYS: dict[str, tuple[str, ...]] = {
    "cola": ("matthews_correlation",),
    "mnli": ("accuracy",),
    "mrpc": ("accuracy", "f1"),
    "qnli": ("accuracy",),
    "qqp": ("accuracy", "f1"),
    "rte": ("accuracy",),
    "sst2": ("accuracy",),
    "stsb": ("pearson", "spearmanr"),
    "wnli": ("accuracy",),
}


def metric_keys(task_name: str | None, num_labels: int) -> tuple[str, ...]:
    """Metric keys reported for a task: the GLUE task's own keys; otherwise accuracy, plus F1 (binary F1 of label 1
    and `macro_f1` for two classes, macro F1 for more), or Pearson / Spearman for a regression (`num_labels == 1`)."""
    if task_name in GLUE_METRIC_KEYS:
        return GLUE_METRIC_KEYS[task_name]
    if num_labels == 1:
        return ("pearson", "spearmanr")
    return ("accuracy", "f1", "macro_f1") if num_labels == 2 else ("accuracy", "f1")


def _sklearn_metric(key: str, num_labels: int) -> Callable[[np.ndarray, np.ndarray], float]:
    from scipy.stats import pearsonr, spearmanr
    from sklearn.metrics import accuracy_score, f1_score, matthews_corrcoef

    if key == "accuracy":
        return accuracy_score
    if key == "f1":
        # evaluate's "f1" (and GLUE's MRPC / QQP F1) is the binary F1 of label 1; macro F1 for multi-class tasks.
        average = "binary" if num_labels <= 2 else "macro"
        return lambda y_true, y_pred: f1_score(y_true, y_pred, average=average)
    if key == "macro_f1":
        return lambda y_true, y_pred: f1_score(y_true, y_pred, average="macro")
    if key == "matthews_correlation":
        return matthews_corrcoef
    if key == "pearson":
        return lambda y_true, y_pred: pearsonr(y_pred, y_true)[0]
    if key == "spearmanr":
        return lambda y_true, y_pred: spearmanr(y_pred, y_true)[0]
    raise ValueError(f"No scikit-learn counterpart for metric {key!r}.")


@dataclass
class TaskMetrics:
    """A `compute_metrics` callable for the Trainer, with the library that computes it (`backend`).

    Args:
        keys: metric names, e.g. `("accuracy", "f1")`.
        num_labels: number of classes (1 = regression).
        backend: `"evaluate"` or `"scikit-learn"`.
        evaluate_modules: the loaded `evaluate` modules (backend `"evaluate"`).
    """

    keys: tuple[str, ...]
    num_labels: int
    backend: str
    evaluate_modules: list[Any] = field(default_factory=list)

    def __call__(self, eval_pred: Any) -> dict[str, float]:
        predictions, labels = eval_pred.predictions, eval_pred.label_ids
        if isinstance(predictions, tuple):
            predictions = predictions[0]
        predictions = np.squeeze(predictions) if self.num_labels == 1 else np.argmax(predictions, axis=-1)
        if self.backend == "evaluate":
            out: dict[str, float] = {}
            for module in self.evaluate_modules:
                kwargs = {}
                if module.name == "f1" and self.num_labels > 2:
                    kwargs["average"] = "macro"
                out.update(module.compute(predictions=predictions, references=labels, **kwargs))
                if module.name == "f1" and "macro_f1" in self.keys:
                    macro = module.compute(predictions=predictions, references=labels, average="macro")
                    out["macro_f1"] = macro["f1"]
            return {k: float(v) for k, v in out.items() if k in self.keys}
        return {k: float(_sklearn_metric(k, self.num_labels)(labels, predictions)) for k in self.keys}


def _load_evaluate(task_name: str | None, keys: tuple[str, ...]) -> list[Any]:
    import evaluate

    if task_name in GLUE_METRIC_KEYS:
        return [evaluate.load("glue", task_name)]
    return [evaluate.load(key) for key in keys if key != "macro_f1"]  # macro_f1: the f1 module, averaged


def _offline() -> bool:
    from huggingface_hub import constants

    flags = ("HF_HUB_OFFLINE", "HF_EVALUATE_OFFLINE")
    env = any(os.environ.get(flag, "").upper() in ("1", "ON", "YES", "TRUE") for flag in flags)
    return env or constants.is_offline_mode()


def build_compute_metrics(task_name: str | None, num_labels: int, backend: str = "auto") -> TaskMetrics:
    """The Trainer's `compute_metrics` for a text-classification task.

    Args:
        task_name: a GLUE task name (`"sst2"`, `"mrpc"`, ...) for the GLUE metric; anything else (an embedded task,
            a file) gets accuracy and F1, or Pearson / Spearman when `num_labels == 1`.
        num_labels: number of classes; 1 for a regression.
        backend: `"auto"` (`evaluate.load`, or scikit-learn when the Hub is declared offline (`HF_HUB_OFFLINE`,
            `HF_EVALUATE_OFFLINE`) or the metric cannot be loaded), `"evaluate"` (fail if it cannot be loaded) or
            `"scikit-learn"`.

    Returns:
        [`TaskMetrics`]: call it with the Trainer's `EvalPrediction`; `.backend` says which library computes it.
    """
    if backend not in ("auto", "evaluate", "scikit-learn"):
        raise ValueError(f"`backend` must be 'auto', 'evaluate' or 'scikit-learn', got {backend!r}")
    keys = metric_keys(task_name, num_labels)
    if backend == "auto" and _offline():
        # `evaluate` could only fetch the metric script from the Hub; skip it (and its slow import) when offline.
        backend = "scikit-learn"
    if backend != "scikit-learn":
        try:
            modules = _load_evaluate(task_name, keys)
            return TaskMetrics(keys, num_labels, "evaluate", modules)
        except Exception as err:  # offline, no cached script, or `evaluate` broken: any failure means "fall back"
            if backend == "evaluate":
                raise
            logger.info(f"`evaluate.load` failed ({type(err).__name__}); computing {keys} with scikit-learn instead.")
    return TaskMetrics(keys, num_labels, "scikit-learn")
