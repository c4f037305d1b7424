"""ragtrain's answer metric as a local `evaluate` module (load it by path, no hub):

    import evaluate
    from ragtrain.evaluation.answers import METRIC_MODULE
    metric = evaluate.load(str(METRIC_MODULE))
    metric.compute(predictions=["Denver Broncos"], references=[["Denver Broncos", "Broncos"]])
    # {"exact_match": 100.0, "f1": 100.0, "accuracy": 100.0}

Exact match, F1 (official SQuAD v1.1 normalisation, max over references) and accuracy (a
normalised reference contained in the prediction), all in percent.
"""

from __future__ import annotations

import datasets
import evaluate

from ragtrain.evaluation.answers import score_answers


class RagQa(evaluate.Metric):
    def _info(self) -> evaluate.MetricInfo:
        return evaluate.MetricInfo(
            description=__doc__,
            citation="Rajpurkar et al., SQuAD: 100,000+ Questions for Machine Comprehension of "
                     "Text (2016)",
            inputs_description="predictions: list of str; references: list of lists of str",
            features=datasets.Features({
                "predictions": datasets.Value("string"),
                "references": datasets.Sequence(datasets.Value("string")),
            }),
        )

    def _compute(self, predictions, references):  # type: ignore[no-untyped-def]
        s = score_answers(predictions, references)
        return {"exact_match": s["em"], "f1": s["f1"], "accuracy": s["accuracy"]}
