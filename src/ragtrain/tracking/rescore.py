"""Re-score a registered RAG model on a question file, with the evaluate stage's metric code,
so a champion evaluated on other data can be compared with a challenger (``ragtrain
evaluate-champion``, the promote flow)."""

from __future__ import annotations

from pathlib import Path

from ragtrain import tracking
from ragtrain.config import RegistryConfig, TrackingConfig
from ragtrain.errors import RegistryError
from ragtrain.tracking.registry import CHAMPION, EVAL_SET_TAG, KIND_TAG, METRIC_TAG, _now


def evaluate_version(rcfg: RegistryConfig, tcfg: TrackingConfig, questions: Path, *,
                     root: Path = Path("."), alias: str = CHAMPION, split: str = "test",
                     record: bool = True) -> tuple[str, dict[str, float]]:
    """Re-score ``name@alias`` on a question file with the evaluate stage's metric code
    (``evaluation.score_answers``): ``{split}/em``, ``/f1``, ``/accuracy`` (percent) and
    ``/n_questions``. ``record``: the metrics and the file's sha256 replace the version's
    recorded ones, so a challenger evaluated on that file can be compared with it."""
    import tempfile

    from ragtrain.data.questions import read_questions
    from ragtrain.evaluation.answers import score_answers
    from ragtrain.io import sha256_file

    rows = read_questions(questions, need_answers=True)
    version = tracking.get_alias(tcfg, rcfg.model_name, alias, root=root)
    if version is not None and tracking.version_tags(
            tcfg, rcfg.model_name, version, root=root).get(KIND_TAG) == "retriever":
        raise RegistryError(f"{rcfg.model_name}@{alias} (version {version}) is a retriever "
                            "model (no generator): it has no answers to score")
    with tempfile.TemporaryDirectory() as tmp:
        version, model = tracking.load_rag_model(tcfg, rcfg.model_name, alias, Path(tmp),
                                                 root=root)
        answers = model.answer([r["question"] for r in rows])
    scores = score_answers([a["answer"] for a in answers], [r["answers"] for r in rows])
    metrics = {f"{split}/{k}": round(v, 4) for k, v in scores.items()}
    metrics[f"{split}/n_questions"] = float(len(rows))
    if record:
        tracking.tag_version(tcfg, rcfg.model_name, version, {
            **{f"{METRIC_TAG}{k}": repr(v) for k, v in metrics.items()},
            EVAL_SET_TAG: sha256_file(Path(questions)),
            "ragtrain.rescored": f"{Path(questions).name} at {_now()}"}, root=root)
    return version, metrics
