"""How many inputs the generator answers from, and how much the retrieval score weighs.

After `make demo` (or any finished run: --root), the trained generator answers every dev and
test question from each of its top ``--max-inputs`` retrieved inputs (``retriever.top_k``
passages each, from artifacts/retrieved) once; then every (answer_from, answer_weight,
answer_null_weight) of the grid is scored from those answers (``generation.reading.pick``). The
setting with the best dev EM (then F1) is the choice; test is printed beside it, never used to
choose.

    python bench/reading.py --root . --max-inputs 5
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from ragtrain import runtime  # noqa: E402
from ragtrain.config import load_config  # noqa: E402
from ragtrain.data.corpus import Corpus  # noqa: E402
from ragtrain.evaluation.answers import score_answers  # noqa: E402
from ragtrain.generation.generator import Generator  # noqa: E402
from ragtrain.generation.reading import pick, read_inputs  # noqa: E402
from ragtrain.io import read_jsonl  # noqa: E402

WEIGHTS = (0.0, 1.0, 1.5, 2.0, 2.5, 3.0, 3.5, 4.0)
NULL_WEIGHTS = (0.0, 0.1, 0.15, 0.2, 0.25, 0.3)  # x log p(empty answer), subtracted


def answers_per_input(root: Path, split: str, gen: Generator, n: int, k: int, bf16: bool,
                      corpus: Corpus) -> tuple[list, list, list]:
    rows = [r for r in read_jsonl(root / f"data/prepared/{split}.jsonl") if r.get("answers")]
    ret = {r["id"]: r for r in read_jsonl(root / f"artifacts/retrieved/{split}.jsonl")}
    t0 = time.perf_counter()
    per_q = read_inputs(gen, [r["question"] for r in rows],
                        [[corpus[p] for p in ret[r["id"]]["passage_ids"][:n * k]] for r in rows],
                        n=n, per_input=k, batch_size=32, bf16=bf16)
    print(f"{split}: {len(rows)} questions x {n} inputs answered in "
          f"{time.perf_counter() - t0:.0f} s", file=sys.stderr)
    return rows, per_q, [ret[r["id"]]["scores"] for r in rows]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--root", type=Path, default=Path("."))
    ap.add_argument("--max-inputs", type=int, default=5)
    args = ap.parse_args()
    cfg = load_config(args.root / "params.yaml")
    k = cfg.retriever.top_k
    corpus = Corpus.load(args.root / "data/prepared/corpus.jsonl")
    gen = Generator.load(args.root / "artifacts/generator")
    bf16 = runtime.use_bf16(cfg.generator.precision)
    table = {}
    for split in ("dev", "test"):
        rows, per_q, scores = answers_per_input(args.root, split, gen, args.max_inputs, k, bf16,
                                                corpus)
        refs = [r["answers"] for r in rows]
        for n in range(1, args.max_inputs + 1):
            for w, nw in ([(w, nw) for w in WEIGHTS for nw in NULL_WEIGHTS] if n > 1
                          else [(0.0, 0.0)]):
                preds = pick([q[:n] for q in per_q], scores, weight=w, per_input=k,
                             null_weight=nw)
                table[split, n, w, nw] = score_answers([p.answer for p in preds], refs)
    dev = {key[1:]: v for key, v in table.items() if key[0] == "dev"}
    best = max(dev, key=lambda s: (dev[s]["em"], dev[s]["f1"], -s[0]))
    print(f"{'answer_from':>11} {'weight':>6} {'null':>5} {'dev EM':>7} {'dev F1':>7} "
          f"{'test EM':>8} {'test F1':>8}")
    for (n, w, nw), m in sorted(dev.items()):
        t = table["test", n, w, nw]
        mark = "  <- best on dev" if (n, w, nw) == best else ""
        print(f"{n:>11} {w:>6.1f} {nw:>5.2f} {m['em']:7.2f} {m['f1']:7.2f} {t['em']:8.2f} "
              f"{t['f1']:8.2f}{mark}")
    print(json.dumps({"best_on_dev": {"answer_from": best[0], "answer_weight": best[1],
                                      "answer_null_weight": best[2]}}))


if __name__ == "__main__":
    main()
