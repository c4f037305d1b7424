"""Which signal tells an unanswerable question from an answerable one: the bi-encoder's cosine
with the first passage (abstention's signal), the generator's probability of the empty answer,
or both.

Needs a finished run whose `retrieve_unanswerable` stage ran (`abstention.enabled: true`; e.g.
`ragtrain params set abstention.enabled=true && ragtrain retrieve-unanswerable` in a copy of the
reference project). For the dev sample (its questions as retrieved, and searched without the
dev articles) and the test split (every question as retrieved, and the test sample searched
without its articles), the trained generator answers from each of its ``answer_from`` inputs
(``generation.reading``) once; every signal is then scored:

- AUC of answerable against unanswerable, on dev and on test;
- the threshold chosen on the dev mixture (``evaluation.abstention.choose_threshold``), applied
  to test: EM / F1 of the answerable questions with abstentions scored 0, the false and the
  correct abstention rates, and the test mixture's F1 (half unanswerable, as on dev).

The signals: ``cosine``; ``p_answer`` = 1 - p(empty answer) of the kept input, the largest
over the inputs (``max``) and that of the top input (``top``); ``cosine - c x p(empty)`` of the
kept input (``evaluation.abstention.abstention_score``) for each c of a grid, and the weight
evaluate chooses on dev (``calibrate`` over ``abstention.null_weights``). Nothing is chosen on
test.

    python bench/abstention.py --root .
"""

from __future__ import annotations

import argparse
import math
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from ragtrain import runtime  # noqa: E402
from ragtrain.config import load_config  # noqa: E402
from ragtrain.data.corpus import Corpus  # noqa: E402
from ragtrain.evaluation.abstention import (  # noqa: E402
    abstention_score,
    calibrate,
    choose_threshold,
    relevance,
    report,
    sample_answered,
)
from ragtrain.evaluation.answers import score_one  # noqa: E402
from ragtrain.generation.generator import Generator, Prediction  # noqa: E402
from ragtrain.generation.reading import pick, read_inputs  # noqa: E402
from ragtrain.io import read_jsonl  # noqa: E402
from ragtrain.retrieval.encoder import BiEncoder  # noqa: E402
from ragtrain.retrieval.passage_text import passage_inputs  # noqa: E402

COMBINED = (0.05, 0.1, 0.2, 0.3, 0.5, 0.75, 1.0)  # c in cosine - c x p(empty answer)


def auc(pos: Sequence[float], neg: Sequence[float]) -> float:
    """P(a positive scores above a negative), ties counted half (Mann-Whitney)."""
    allv = sorted([(v, 1) for v in pos] + [(v, 0) for v in neg])
    rank_sum, i = 0.0, 0
    while i < len(allv):
        j = i
        while j < len(allv) and allv[j][0] == allv[i][0]:
            j += 1
        mid = (i + j + 1) / 2  # 1-based mean rank of the tie group
        rank_sum += mid * sum(lab for _, lab in allv[i:j])
        i = j
    n_pos, n_neg = len(pos), len(neg)
    return (rank_sum - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg)


class Asked:
    """Questions answered from each of their inputs: cosine, per-input answers, the kept one."""

    def __init__(self, rows: list, retrieved: dict, gen: Generator, encoder: BiEncoder,
                 corpus: Corpus, cfg, bf16: bool) -> None:
        gc, k = cfg.generator, cfg.retriever.top_k
        ids = [retrieved[r["id"]]["passage_ids"] for r in rows]
        self.cos = relevance(encoder, [r["question"] for r in rows],
                             passage_inputs([corpus[p[0]] for p in ids]), bf16=bf16)
        self.per_input = read_inputs(gen, [r["question"] for r in rows],
                                     [[corpus[p] for p in x[:k * gc.answer_from]] for x in ids],
                                     n=gc.answer_from, per_input=k,
                                     batch_size=gc.eval_batch_size, bf16=bf16)
        self.kept: list[Prediction] = pick(
            self.per_input, [retrieved[r["id"]]["scores"] for r in rows],
            weight=gc.answer_weight, per_input=k, null_weight=gc.answer_null_weight)
        self.scores = [score_one(p.answer, r["answers"]) for p, r in zip(self.kept, rows,
                                                                          strict=True)]


def not_null(p: Prediction) -> float:
    return 1.0 - math.exp(p.null)


SIGNALS: dict[str, Callable[[Asked, int], float]] = {
    "cosine": lambda a, i: a.cos[i],
    "p_answer kept": lambda a, i: not_null(a.kept[i]),
    "p_answer max": lambda a, i: max(not_null(p) for p in a.per_input[i]),
    "p_answer top": lambda a, i: not_null(a.per_input[i][0]),
    **{f"cosine - {c} p_null": (lambda c: lambda a, i: abstention_score(a.cos[i], a.kept[i].null,
                                                                         c))(c)
       for c in COMBINED},
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--root", type=Path, default=Path("."))
    args = ap.parse_args()
    root = args.root
    cfg = load_config(root / "params.yaml")
    corpus = Corpus.load(root / "data/prepared/corpus.jsonl")
    gen = Generator.load(root / "artifacts/generator")
    encoder = BiEncoder.load(root / "artifacts/retriever")
    bf16 = runtime.use_bf16(cfg.generator.precision)

    def retrieved(path: str) -> dict:
        return {r["id"]: r for r in read_jsonl(root / path)}

    def questions(split: str) -> list:
        return read_jsonl(root / f"data/prepared/{split}.jsonl")

    n_dev, n_test = cfg.abstention.dev_questions, cfg.abstention.test_questions
    dev = sample_answered(questions("dev"), n_dev, cfg.seed)
    test = [r for r in questions("test") if r.get("answers")]
    test_u = sample_answered(test, n_test, cfg.seed)
    sets = {"dev": (dev, retrieved("artifacts/retrieved/dev.jsonl")),
            "dev_u": (dev, retrieved("artifacts/unanswerable/dev.jsonl")),
            "test": (test, retrieved("artifacts/retrieved/test.jsonl")),
            "test_u": (test_u, retrieved("artifacts/unanswerable/test.jsonl"))}
    asked = {name: Asked(rows, ret, gen, encoder, corpus, cfg, bf16)
             for name, (rows, ret) in sets.items()}
    for name, a in asked.items():
        em = 100 * sum(s["em"] for s in a.scores) / len(a.scores)
        print(f"{name}: {len(a.scores)} questions, EM as answered {em:.2f}", file=sys.stderr)

    print(f"{'signal':<24} {'dev AUC':>7} {'test AUC':>8} {'dev mixF1':>9} {'test EM':>7} "
          f"{'test F1':>7} {'false ab':>8} {'correct ab':>10} {'test mixF1':>10}")
    for name, sig in SIGNALS.items():
        s = {k: [sig(a, i) for i in range(len(a.kept))] for k, a in asked.items()}
        cal = choose_threshold([(v, 100 * sc["f1"]) for v, sc in zip(s["dev"], asked["dev"].scores,
                                                                      strict=True)], s["dev_u"])
        m = report("test", cal, [(v, 100 * sc["em"], 100 * sc["f1"]) for v, sc in zip(
            s["test"], asked["test"].scores, strict=True)], s["test_u"])
        correct = m["test/abstain/correct_abstention_rate"]
        mix = (m["test/abstain/f1"] + 100 * correct) / 2  # the test mixture, half / half as dev
        print(f"{name:<24} {auc(s['dev'], s['dev_u']):7.3f} {auc(s['test'], s['test_u']):8.3f} "
              f"{cal.f1:9.2f} {m['test/abstain/em']:7.2f} {m['test/abstain/f1']:7.2f} "
              f"{m['test/abstain/false_abstention_rate']:8.3f} {correct:10.3f} {mix:10.2f}")
    cal = calibrate([(r, p.null, 100 * sc["f1"]) for r, p, sc in zip(
        asked["dev"].cos, asked["dev"].kept, asked["dev"].scores, strict=True)],
        [(r, p.null) for r, p in zip(asked["dev_u"].cos, asked["dev_u"].kept, strict=True)],
        cfg.abstention.null_weights)
    print(f"evaluate's choice (abstention.null_weights {cfg.abstention.null_weights}): weight "
          f"{cal.null_weight}, threshold {cal.threshold:.4f}, dev mixture F1 {cal.f1:.2f}")


if __name__ == "__main__":
    main()
