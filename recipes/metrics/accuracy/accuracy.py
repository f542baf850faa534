"""Accuracy as an `evaluate` metric module that lives in this repository, so `evaluate.load` never reaches the hub.

Load it by path: `evaluate.load("recipes/metrics/accuracy")` (a folder holding `accuracy.py`). It computes the same
number as the hub's `accuracy` metric: the fraction of predictions equal to their reference, optionally weighted.
"""

import datasets
import evaluate
import numpy as np

_DESCRIPTION = "Accuracy: the fraction of predictions that equal their reference label."

_KWARGS_DESCRIPTION = """
Args:
    predictions (`list` of `int`): predicted labels.
    references (`list` of `int`): true labels.
    sample_weight (`list` of `float`, *optional*): per-example weights.
Returns:
    accuracy (`float`): in [0, 1].
Example:
    >>> metric = evaluate.load("recipes/metrics/accuracy")
    >>> metric.compute(predictions=[0, 1, 1], references=[0, 1, 0])
    {'accuracy': 0.6666666666666666}
"""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class Accuracy(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation="",
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features(
                {"predictions": datasets.Value("int64"), "references": datasets.Value("int64")}
            ),
        )

    def _compute(self, predictions, references, sample_weight=None):
        predictions, references = np.asarray(predictions), np.asarray(references)
        correct = (predictions == references).astype(np.float64)
        if sample_weight is None:
            return {"accuracy": float(correct.mean()) if len(correct) else 0.0}
        weights = np.asarray(sample_weight, dtype=np.float64)
        return {"accuracy": float((correct * weights).sum() / weights.sum())}
