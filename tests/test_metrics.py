"""Macro-F1 must match scikit-learn's definition (zero_division=0) without depending on it."""

from __future__ import annotations

import numpy as np
import pytest

from hf_prune.metrics import classification_metrics, compute_metrics


def test_hand_computed_example():
    labels = [0, 0, 0, 1, 1, 2]
    predictions = [0, 0, 1, 1, 2, 2]
    # class 0: TP 2, FP 0, FN 1 -> F1 4/5; class 1: TP 1, FP 1, FN 1 -> 1/2; class 2: TP 1, FP 1, FN 0 -> 2/3.
    result = classification_metrics(predictions, labels)
    assert result["accuracy"] == pytest.approx(4 / 6)
    assert result["macro_f1"] == pytest.approx((4 / 5 + 1 / 2 + 2 / 3) / 3)


def test_perfect_predictions():
    result = classification_metrics([2, 0, 1, 1], [2, 0, 1, 1])
    assert result == {"accuracy": 1.0, "macro_f1": 1.0}


def test_majority_class_scores_high_accuracy_but_low_macro_f1():
    # 6 negative, 3 neutral, 1 positive, all predicted negative: F1 of negative is 2*6/(12+4) = 3/4, the others 0.
    labels = [0] * 6 + [1] * 3 + [2]
    result = classification_metrics([0] * 10, labels)
    assert result["accuracy"] == pytest.approx(0.6)
    assert result["macro_f1"] == pytest.approx(0.25)


def test_num_labels_counts_absent_classes_as_zero():
    # Only classes 0 and 1 occur; with num_labels=3 class 2 still enters the average.
    assert classification_metrics([0, 1], [0, 1])["macro_f1"] == pytest.approx(1.0)
    assert classification_metrics([0, 1], [0, 1], num_labels=3)["macro_f1"] == pytest.approx(2 / 3)


def test_class_only_in_predictions_is_averaged():
    # Class 2 is never a true label but is predicted once: it counts, with F1 0.
    result = classification_metrics([0, 2], [0, 0])
    assert result["macro_f1"] == pytest.approx((2 / 3 + 0.0) / 2)


def test_bad_inputs_are_refused():
    with pytest.raises(ValueError, match="items"):
        classification_metrics([0, 1], [0])
    with pytest.raises(ValueError, match="argmax"):
        classification_metrics(np.zeros((2, 3)), [0, 1])
    with pytest.raises(ValueError, match="zero examples"):
        classification_metrics([], [])
    with pytest.raises(ValueError, match="0..2"):
        classification_metrics([0, 3], [0, 1], num_labels=3)


def test_compute_metrics_takes_argmax_of_logits():
    logits = np.array([[2.0, 0.1, 0.0], [0.0, 3.0, 0.1], [0.0, 3.0, 0.1], [0.1, 0.0, 1.0]])
    labels = np.array([0, 1, 2, 2])
    result = compute_metrics((logits, labels))
    assert result == classification_metrics([0, 1, 1, 2], labels, num_labels=3)
    assert result["accuracy"] == pytest.approx(0.75)


def test_compute_metrics_accepts_tuple_outputs_and_eval_prediction():
    from transformers import EvalPrediction

    logits = np.array([[0.0, 1.0], [1.0, 0.0]])
    hidden = np.zeros((2, 4, 8))
    result = compute_metrics(EvalPrediction(predictions=(logits, hidden), label_ids=np.array([1, 0])))
    assert result == {"accuracy": 1.0, "macro_f1": 1.0}


def test_compute_metrics_uses_every_class_of_the_head():
    # A 3-way head that never predicts class 2 on data without class 2 still averages over three classes.
    logits = np.array([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]])
    assert compute_metrics((logits, np.array([0, 1])))["macro_f1"] == pytest.approx(2 / 3)


def test_compute_metrics_ignores_minus_100_labels():
    logits = np.array([[1.0, 0.0], [0.0, 1.0], [1.0, 0.0]])
    result = compute_metrics((logits, np.array([0, 1, -100])))
    assert result == {"accuracy": 1.0, "macro_f1": 1.0}


def test_agrees_with_reference_formula_on_random_data():
    # Cross-check against precision/recall computed the textbook way, on data where every class is predicted.
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 3, size=500)
    predictions = np.where(rng.random(500) < 0.6, labels, rng.integers(0, 3, size=500))
    f1s = []
    for c in range(3):
        precision = np.mean(labels[predictions == c] == c)
        recall = np.mean(predictions[labels == c] == c)
        f1s.append(2 * precision * recall / (precision + recall))
    result = classification_metrics(predictions, labels)
    assert result["macro_f1"] == pytest.approx(np.mean(f1s))
    assert result["accuracy"] == pytest.approx(np.mean(predictions == labels))
