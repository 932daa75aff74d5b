"""Accuracy and macro-F1 in numpy, for ``Trainer(compute_metrics=...)``.

Written out here rather than taken from scikit-learn (not a dependency) or ``evaluate.load`` (which downloads the
metric script from the Hub, unreachable offline). Macro-F1 follows scikit-learn's ``f1_score(average="macro",
zero_division=0)``: a class that is never predicted counts as F1 0, which is what makes it the honest number on
unbalanced data where always answering the majority class still scores a high accuracy.
"""

from __future__ import annotations

from typing import Any

import numpy as np

# Label id that Transformers uses for positions to ignore; never a class.
_IGNORE_INDEX = -100


def classification_metrics(predictions: Any, labels: Any, num_labels: int | None = None) -> dict[str, float]:
    """Accuracy and macro-F1 of predicted class ids against true class ids.

    Args:
        predictions: predicted class ids, shape ``(n,)`` (take the argmax of logits first).
        labels: true class ids, shape ``(n,)``.
        num_labels: number of classes; when given, macro-F1 averages over ``0..num_labels-1``, so a class absent from
            both arrays still counts (as 0). When ``None``, it averages over the classes present in either array.

    Returns:
        ``{"accuracy": float, "macro_f1": float}``, both in [0, 1].
    """
    predictions = np.asarray(predictions)
    labels = np.asarray(labels)
    if predictions.ndim != 1 or labels.ndim != 1:
        raise ValueError(
            f"Expected 1-D class ids, got predictions of shape {predictions.shape} and labels of shape "
            f"{labels.shape}; take the argmax of logits first (or use compute_metrics)."
        )
    if predictions.shape != labels.shape:
        raise ValueError(f"predictions has {predictions.shape[0]} items but labels has {labels.shape[0]}.")
    if labels.size == 0:
        raise ValueError("Cannot compute metrics on zero examples.")
    predictions = predictions.astype(np.int64)
    labels = labels.astype(np.int64)

    ids = np.concatenate([predictions, labels])
    if num_labels is not None and (ids.min() < 0 or ids.max() >= num_labels):
        raise ValueError(f"Class ids must lie in 0..{num_labels - 1} when num_labels={num_labels}.")
    classes = np.arange(num_labels) if num_labels is not None else np.union1d(predictions, labels)
    f1_scores = []
    for c in classes:
        true_positive = np.sum((predictions == c) & (labels == c))
        false_positive = np.sum((predictions == c) & (labels != c))
        false_negative = np.sum((predictions != c) & (labels == c))
        # 2TP / (2TP + FP + FN) equals 2PR / (P + R), but a never-predicted or absent class gives 0 here, not NaN.
        denominator = 2 * true_positive + false_positive + false_negative
        f1_scores.append(2 * true_positive / denominator if denominator > 0 else 0.0)

    return {
        "accuracy": float(np.mean(predictions == labels)),
        "macro_f1": float(np.mean(f1_scores)) if f1_scores else 0.0,
    }


def compute_metrics(eval_pred: Any) -> dict[str, float]:
    """``Trainer`` hook: accuracy and macro-F1 from an ``EvalPrediction`` (or a ``(logits, labels)`` pair).

    Models that return more than logits (hidden states, attentions) arrive as a tuple whose first item is the
    logits. Positions labelled -100 are left out, as Transformers' losses do.
    """
    logits, labels = eval_pred
    if isinstance(logits, (tuple, list)):
        logits = logits[0]
    logits = np.asarray(logits)
    labels = np.asarray(labels)
    keep = labels != _IGNORE_INDEX
    return classification_metrics(logits.argmax(axis=-1)[keep], labels[keep], num_labels=logits.shape[-1])
