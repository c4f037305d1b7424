"""How many beams the copy generator's constrained decoding searches, and answer voting.

After `make demo` (or any finished run: --root), the trained copy generator answers the dev
questions (then --split test, never used to choose) from each of their top 3 retrieved
passages, once per ``generator.num_beams`` value (1 = greedy; every decoder extends a
contiguous passage span and ends it only at a word boundary; the hypothesis with the best mean
token log-probability is kept). Beside, answer voting: the answers of the 3 passages grouped
by their SQuAD-normalised text, each group scored by the log-sum-exp of its members' scores
(RAG-Sequence's marginalisation over passages) instead of the single best one.

Each row prints EM / F1 of the top passage alone, of the 3 passages with the run's
``generator.answer_weight`` (``generation.reading.pick``), and the decoding time.

    python bench/decoding.py --root . --beams 1 2 4 [--limit 400] [--split dev]

``--step-attention both`` decodes each setting twice: with the one-token steps on the eager
attention (``models.one_token_attention``, what ragtrain runs on the CPU) and on SDPA (as
before), and prints the time ratio and how many answers differ.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import sys
import time
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from ragtrain import runtime  # noqa: E402
from ragtrain.config import load_config  # noqa: E402
from ragtrain.data.corpus import Corpus  # noqa: E402
from ragtrain.data.questions import answered  # noqa: E402
from ragtrain.evaluation.answers import normalize_answer, score_answers  # noqa: E402
from ragtrain.generation import copy as copy_module  # noqa: E402
from ragtrain.generation.copy import CopyBackend  # noqa: E402
from ragtrain.generation.generator import Generator, Prediction  # noqa: E402
from ragtrain.generation.reading import pick, read_inputs  # noqa: E402
from ragtrain.pipeline.paths import (  # noqa: E402
    Paths,
    read_queries,
    read_retrieved,
    read_retrieved_scores,
)


def vote(per_q: list[list[Prediction]], scores: list[list[float]], weight: float) -> list[str]:
    """Per question: the answer text whose passages' scores sum highest (log-sum-exp of
    answer score + weight x retrieval score over the inputs giving that normalised answer)."""
    out = []
    for preds, s in zip(per_q, scores, strict=True):
        groups: dict[str, list[Any]] = {}
        for p, r in zip(preds, s, strict=False):
            g = groups.setdefault(normalize_answer(p.answer), [p.answer, []])
            g[1].append(p.score + weight * r)
        out.append(max(groups.values(), key=lambda g: torch.tensor(g[1]).logsumexp(0))[0])
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--root", type=Path, default=ROOT)
    ap.add_argument("--split", default="dev")
    ap.add_argument("--beams", type=int, nargs="+", default=[1, 2, 4])
    ap.add_argument("--limit", type=int, default=0, help="first N questions only (0: all)")
    ap.add_argument("--step-attention", choices=["eager", "sdpa", "both"], default="eager",
                    help="the decoding steps' attention on the CPU (both: side by side)")
    args = ap.parse_args()
    cfg = load_config(args.root / "params.yaml")
    gc = cfg.generator
    paths = Paths(args.root)
    gen = Generator.load(paths.generator)
    if not isinstance(gen, CopyBackend):
        raise SystemExit("bench/decoding.py: the run's generator is not the copy kind")
    corpus = Corpus.load(paths.corpus)
    rows, _ = answered(read_queries(paths, args.split))
    rows = rows[:args.limit] if args.limit else rows
    ret, ret_scores = read_retrieved(paths, args.split), read_retrieved_scores(paths, args.split)
    questions = [r["question"] for r in rows]
    passages = [[corpus[p] for p in ret[r["id"]][:3]] for r in rows]
    scores = [ret_scores[r["id"]][:3] for r in rows]
    refs = [r["answers"] for r in rows]
    bf16 = runtime.use_bf16(gc.precision)
    print(f"{args.split}: {len(rows)} questions, top 3 passages each, answer_weight "
          f"{gc.answer_weight}")
    print(f"{'decoder':<34}{'top-1 EM / F1':>16}{'3 inputs EM / F1':>20}{'voting EM / F1':>18}"
          f"{'seconds':>9}")
    eager_steps = copy_module.one_token_attention
    kernels = ["eager", "sdpa"] if args.step_attention == "both" else [args.step_attention]
    for beams in args.beams:
        gen.spec = dataclasses.replace(gen.spec, num_beams=beams)
        answers, took = {}, {}
        for kernel in kernels:
            copy_module.one_token_attention = (  # type: ignore[assignment]
                eager_steps if kernel == "eager" else lambda m: contextlib.nullcontext())
            t0 = time.perf_counter()
            per_q = read_inputs(gen, questions, passages, n=3, per_input=1,
                                batch_size=gc.eval_batch_size, bf16=bf16)
            took[kernel] = seconds = time.perf_counter() - t0
            answers[kernel] = [p.answer for q in per_q for p in q]
            cells = [score_answers([q[0].answer for q in per_q], refs),
                     score_answers([p.answer for p in pick(
                         per_q, scores, weight=gc.answer_weight,
                         null_weight=gc.answer_null_weight)], refs),
                     score_answers(vote(per_q, scores, gc.answer_weight), refs)]
            name = "greedy" if beams == 1 else f"beam search, {beams} beams"
            name += f", {kernel} steps" if len(kernels) > 1 else ""
            print(f"{name:<34}" + "".join(f"{c['em']:>9.2f} / {c['f1']:5.2f}" for c in cells)
                  + f"{seconds:>9.0f}")
        if len(kernels) > 1:
            differ = sum(a != b for a, b in zip(answers["eager"], answers["sdpa"], strict=True))
            print(f"  eager steps: {took['sdpa'] / took['eager']:.2f}x the speed of SDPA steps; "
                  f"{differ} of {len(answers['eager'])} answers differ")
    copy_module.one_token_attention = eager_steps

if __name__ == "__main__":
    main()
