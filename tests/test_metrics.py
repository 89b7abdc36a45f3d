"""metrics.py against scikit-learn and hand-computed values."""

from __future__ import annotations

import json
import math
import warnings

import numpy as np
import pytest
from sklearn import exceptions as skm_exceptions
from sklearn import metrics as skm

from transferstudy.metrics import (
    macro_f1,
    normalize_rows,
    score,
    top_confused_pairs,
    top_k_accuracy,
)

C = 8


@pytest.fixture
def predictions():
    """60 rows over 8 classes; class 7 never occurs in y_true (but may be predicted)."""
    rng = np.random.default_rng(42)
    y_true = rng.integers(0, C - 1, size=60)
    probs = rng.dirichlet(np.ones(C), size=60)
    probs[np.arange(30), y_true[:30]] += 0.5  # half of the rows mostly right
    probs /= probs.sum(1, keepdims=True)
    return y_true, probs


def test_scores_equal_sklearn(predictions):
    y_true, probs = predictions
    y_pred = probs.argmax(1)
    labels = np.arange(C)
    s = score(y_true, probs, C)

    assert s.accuracy == pytest.approx(skm.accuracy_score(y_true, y_pred))
    assert s.weighted_f1 == pytest.approx(
        skm.f1_score(y_true, y_pred, labels=labels, average="weighted", zero_division=0)
    )
    assert s.macro_f1 == pytest.approx(skm.f1_score(y_true, y_pred, average="macro", zero_division=0))
    p, r, f, n = skm.precision_recall_fscore_support(y_true, y_pred, labels=labels, zero_division=0)
    np.testing.assert_allclose(s.precision, p)
    np.testing.assert_allclose(s.recall, r)
    np.testing.assert_allclose(s.f1, f)
    np.testing.assert_array_equal(s.support, n)
    assert s.support[C - 1] == 0
    np.testing.assert_array_equal(s.confusion, skm.confusion_matrix(y_true, y_pred, labels=labels))
    assert s.confusion.shape == (C, C)
    assert s.top5 == pytest.approx(skm.top_k_accuracy_score(y_true, probs, k=5, labels=labels))
    assert 0 < s.accuracy < s.top5 < 1


def test_hand_computed_example():
    y_true = np.array([0, 0, 1, 1, 2, 2])
    y_pred = np.array([0, 1, 1, 1, 2, 0])
    s = score(y_true, np.eye(3)[y_pred], 3)
    assert s.accuracy == pytest.approx(4 / 6)
    np.testing.assert_allclose(s.precision, [1 / 2, 2 / 3, 1.0])
    np.testing.assert_allclose(s.recall, [1 / 2, 1.0, 1 / 2])
    np.testing.assert_allclose(s.f1, [1 / 2, 4 / 5, 2 / 3])
    assert s.macro_f1 == pytest.approx((1 / 2 + 4 / 5 + 2 / 3) / 3)
    assert s.weighted_f1 == pytest.approx((1 / 2 + 4 / 5 + 2 / 3) / 3)  # equal supports
    np.testing.assert_array_equal(s.confusion, [[1, 1, 0], [0, 2, 0], [1, 0, 1]])
    assert s.top5 == 1.0  # only 3 classes: top-5 covers them all


def test_macro_f1_over_classes_that_occur():
    y_true = np.array([0, 0, 1, 1])
    y_pred = np.array([0, 0, 1, 2])  # class 2 predicted but absent; class 3 neither
    expected = skm.f1_score(y_true, y_pred, average="macro", zero_division=0)
    assert macro_f1(y_true, y_pred, num_classes=4) == pytest.approx(expected)
    assert expected == pytest.approx((1 + 2 / 3 + 0) / 3)
    assert macro_f1(y_true, y_true, num_classes=4) == 1.0  # absent, unpredicted classes do not count


@pytest.mark.parametrize("seed", range(5))
def test_macro_f1_equals_sklearn_over_the_labels_that_occur(seed):
    rng = np.random.default_rng(seed)
    y_true, y_pred = rng.integers(0, 6, size=40), rng.integers(0, 7, size=40)  # class 6 only ever predicted
    present = np.union1d(y_true, y_pred)
    expected = skm.f1_score(y_true, y_pred, labels=present, average="macro", zero_division=0)
    assert macro_f1(y_true, y_pred, num_classes=8) == pytest.approx(expected, abs=1e-12)


def test_scores_from_logits_equal_scores_from_probabilities(predictions):
    y_true, probs = predictions
    logits = np.log(probs) + 3.0
    a, b = score(y_true, probs, C), score(y_true, logits, C)
    assert a.summary() == b.summary()
    np.testing.assert_array_equal(a.confusion, b.confusion)


@pytest.mark.parametrize("k", [1, 2, 5])
def test_top_k_equals_sklearn(predictions, k):
    y_true, probs = predictions
    assert top_k_accuracy(probs, y_true, k) == pytest.approx(
        skm.top_k_accuracy_score(y_true, probs, k=k, labels=np.arange(C))
    )


def test_top_k_edge_cases():
    probs = np.array([[0.1, 0.7, 0.2], [0.5, 0.3, 0.2]])
    y = np.array([0, 0])
    assert top_k_accuracy(probs, y, 1) == 0.5
    assert top_k_accuracy(probs, y, 2) == 0.5
    assert top_k_accuracy(probs, y, 10) == 1.0  # k larger than the class count
    assert math.isnan(top_k_accuracy(np.zeros((0, 3)), np.zeros(0, dtype=int), 5))


@pytest.mark.parametrize(
    "y_true, y_pred, num_classes",
    [
        ([1, 1, 1], [1, 1, 1], 3),  # a single label; two classes neither true nor predicted
        ([0, 0, 1], [2, 2, 2], 3),  # nothing right; a predicted class that is never true
        ([0, 0], [0, 0], 1),  # one class: scikit-learn's "single label" confusion-matrix warning
    ],
)
def test_scores_of_a_thin_split_print_no_library_warning(y_true, y_pred, num_classes):
    y_true, y_pred = np.array(y_true), np.array(y_pred)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        score(y_true, np.eye(num_classes)[y_pred], num_classes)
        macro_f1(y_true, y_pred, num_classes)
    assert [f"{w.category.__name__}: {w.message}" for w in caught] == []


def test_sklearn_warnings_are_silenced_only_inside_the_metrics(monkeypatch):
    # A scikit-learn version that warns where this one does not still prints nothing from
    # score(), and the same warning raised outside it still shows: no global filter.
    real_f1 = skm.f1_score

    def warning_f1(*args, **kwargs):
        warnings.warn("F-score is ill-defined", skm_exceptions.UndefinedMetricWarning, stacklevel=2)
        return real_f1(*args, **kwargs)

    monkeypatch.setattr(skm, "f1_score", warning_f1)  # score() looks scikit-learn's functions up when called
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        score(np.array([0, 1]), np.eye(3)[[0, 2]], 3)
        assert caught == []
        warnings.warn("outside", skm_exceptions.UndefinedMetricWarning, stacklevel=1)
    assert [str(w.message) for w in caught] == ["outside"]


def test_empty_predictions_are_nan_not_errors():
    s = score(np.zeros(0, dtype=np.int64), np.zeros((0, 4)), 4)
    assert math.isnan(s.accuracy) and math.isnan(s.top5) and math.isnan(s.macro_f1)
    assert s.confusion.shape == (4, 4) and s.confusion.sum() == 0


def test_to_dict_is_json(predictions):
    y_true, probs = predictions
    d = score(y_true, probs, C).to_dict()
    assert json.loads(json.dumps(d))["confusion"] == score(y_true, probs, C).confusion.tolist()


def test_top_confused_pairs():
    names = ["a", "b", "c", "d"]
    confusion = np.array(
        [
            [5, 3, 0, 0],
            [1, 4, 6, 0],
            [0, 3, 7, 0],
            [0, 0, 0, 0],
        ]
    )
    pairs = top_confused_pairs(confusion, names)
    assert [(p["true"], p["predicted"], p["count"]) for p in pairs] == [
        ("b", "c", 6),
        ("a", "b", 3),  # tie with (c, b): row-major order
        ("c", "b", 3),
        ("b", "a", 1),
    ]
    assert pairs[0]["share"] == pytest.approx(6 / 11)
    assert pairs[2]["share"] == pytest.approx(3 / 10)
    assert len(top_confused_pairs(confusion, names, k=2)) == 2
    assert top_confused_pairs(np.diag([3, 4]), ["x", "y"]) == []  # no confusions at all


def test_normalize_rows():
    confusion = np.array([[2, 2], [0, 0]])
    np.testing.assert_allclose(normalize_rows(confusion), [[0.5, 0.5], [0.0, 0.0]])
