"""Classification metrics: accuracy, top-5, macro/weighted F1, per-class report, confusions.

Thin wrappers over scikit-learn, with the label set fixed to every class so that classes
absent from a small split still count (as zeros) and shapes never depend on the data.
scikit-learn's warnings about such splits (undefined precision, a single label) are kept off
the console: a class missing from a split is expected here, and the study names it once in its
own words (the dataset summary's warnings). The per-epoch macro-F1 is plain numpy (the same
numbers, tested against scikit-learn), so a training process does not import scikit-learn.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator
from dataclasses import asdict, dataclass

import numpy as np


@contextlib.contextmanager
def _quiet_sklearn() -> Iterator[None]:
    """Silence scikit-learn's warnings about classes a split lacks, for this block only."""
    from sklearn.exceptions import UndefinedMetricWarning

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UndefinedMetricWarning)
        warnings.filterwarnings("ignore", message="A single label was found", category=UserWarning)
        yield


def top_k_accuracy(probs: np.ndarray, y_true: np.ndarray, k: int = 5) -> float:
    """Share of rows whose true class is among the ``k`` highest scores (ties broken by index)."""
    if len(y_true) == 0:
        return float("nan")
    k = min(k, probs.shape[1])
    top = np.argsort(-probs, axis=1, kind="stable")[:, :k]
    return float((top == y_true[:, None]).any(axis=1).mean())


@dataclass
class ClassificationScores:
    """Scores of one set of predictions; arrays are indexed by class."""

    accuracy: float
    top5: float
    macro_f1: float
    weighted_f1: float
    precision: np.ndarray
    recall: np.ndarray
    f1: np.ndarray
    support: np.ndarray
    confusion: np.ndarray  # rows = true class, columns = predicted class

    def summary(self) -> dict[str, float]:
        return {
            "accuracy": self.accuracy,
            "top5": self.top5,
            "macro_f1": self.macro_f1,
            "weighted_f1": self.weighted_f1,
        }

    def to_dict(self) -> dict:
        return {k: v.tolist() if isinstance(v, np.ndarray) else v for k, v in asdict(self).items()}


def score(y_true: np.ndarray, probs: np.ndarray, num_classes: int | None = None) -> ClassificationScores:
    """All metrics from true labels and per-class scores (probabilities or logits)."""
    y_true = np.asarray(y_true)
    num_classes = num_classes or probs.shape[1]
    labels = np.arange(num_classes)
    if len(y_true) == 0:  # an empty split (no holdout, say): NaN scores; scikit-learn refuses empty input
        nan, zeros = float("nan"), np.zeros(num_classes)
        counts = np.zeros(num_classes, dtype=np.int64)
        return ClassificationScores(
            nan,
            nan,
            nan,
            nan,
            zeros,
            zeros.copy(),
            zeros.copy(),
            counts,
            np.zeros((num_classes, num_classes), dtype=np.int64),
        )
    from sklearn.metrics import accuracy_score, confusion_matrix, f1_score, precision_recall_fscore_support

    y_pred = probs.argmax(axis=1)
    with _quiet_sklearn():
        p, r, f, s = precision_recall_fscore_support(y_true, y_pred, labels=labels, zero_division=0)
        weighted = float(f1_score(y_true, y_pred, labels=labels, average="weighted", zero_division=0))
        confusion = confusion_matrix(y_true, y_pred, labels=labels)
    return ClassificationScores(
        accuracy=float(accuracy_score(y_true, y_pred)),
        top5=top_k_accuracy(probs, y_true, 5),
        macro_f1=macro_f1(y_true, y_pred, num_classes),
        weighted_f1=weighted,
        precision=p,
        recall=r,
        f1=f,
        support=s,
        confusion=confusion,
    )


def macro_f1(y_true: np.ndarray, y_pred: np.ndarray, num_classes: int) -> float:
    """Unweighted mean of per-class F1 over the classes that are true or predicted at least once
    (scikit-learn's ``f1_score(average="macro", zero_division=0)`` over those labels).

    Per class, F1 = 2 TP / (2 TP + FP + FN): 0 when the class is never right.
    """
    if len(y_true) == 0:
        return float("nan")
    y_true, y_pred = np.asarray(y_true, dtype=np.int64), np.asarray(y_pred, dtype=np.int64)
    size = int(max(num_classes, y_true.max() + 1, y_pred.max() + 1))
    tp = np.bincount(y_true[y_true == y_pred], minlength=size).astype(np.float64)
    true_count = np.bincount(y_true, minlength=size)
    pred_count = np.bincount(y_pred, minlength=size)
    present = (true_count + pred_count) > 0
    f1 = 2 * tp[present] / (true_count[present] + pred_count[present])  # 2TP + FP + FN = |true| + |pred|
    return float(f1.mean())


def top_confused_pairs(confusion: np.ndarray, class_names: list[str], k: int = 20) -> list[dict]:
    """The ``k`` largest off-diagonal cells: (true, predicted, count, share of the true class)."""
    off = confusion.astype(np.int64).copy()
    np.fill_diagonal(off, 0)
    flat = np.argsort(-off, axis=None, kind="stable")[:k]
    rows = confusion.sum(axis=1)
    pairs = []
    for t, p in zip(*np.unravel_index(flat, off.shape)):
        if off[t, p] == 0:
            break
        pairs.append(
            {
                "true": class_names[t],
                "predicted": class_names[p],
                "count": int(off[t, p]),
                "share": float(off[t, p] / rows[t]) if rows[t] else 0.0,
            }
        )
    return pairs


def normalize_rows(confusion: np.ndarray) -> np.ndarray:
    """Each row divided by its total (the recall view); empty rows stay zero."""
    totals = confusion.sum(axis=1, keepdims=True)
    return np.divide(confusion, totals, out=np.zeros(confusion.shape, dtype=float), where=totals > 0)
