"""Does the copy generator lose answers to greedy decoding? Beam search and answer voting.

After `make demo` (or any finished run: --root), the trained copy generator answers the dev
questions (then --split test, never used to choose) from each of their top 3 retrieved
passages, once per decoder:

- greedy constrained decoding (what ragtrain runs: each step extends a contiguous passage span
  or stops);
- constrained beam search with K beams (K = 1 is the greedy decoder again, checked), the
  hypothesis with the best mean token log-probability kept; a span may end only at a word
  boundary (never inside a WordPiece word), since beams otherwise keep "homeschoolin";
- answer voting: the answers of the 3 passages grouped by their SQuAD-normalised text and each
  group scored by the log-sum-exp of its members' scores (RAG-Sequence's marginalisation over
  passages), instead of the single best one.

Each row prints EM / F1 of the top passage alone, of the 3 passages with the run's
``generator.answer_weight`` (``generation.reading.pick``), and the decoding time.

    python bench/decoding.py --root . --beams 2 4 [--limit 400] [--split dev]
"""

from __future__ import annotations

import argparse
import math
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
from ragtrain.evaluation.answers import normalize_answer, score_answers  # noqa: E402
from ragtrain.generation.copy import CopyBackend  # noqa: E402
from ragtrain.generation.generator import Generator, Prediction, on_device  # noqa: E402
from ragtrain.generation.reading import pick, read_inputs  # noqa: E402
from ragtrain.io import read_jsonl  # noqa: E402


def beam_batch(gen: CopyBackend, chunk: list[dict[str, Any]], beams: int) -> list[Prediction]:
    """Constrained beam search over one batch: ``beams`` hypotheses per source, each extending
    a contiguous passage span or ending at a word boundary; the best mean log-prob is kept."""
    model, tok, k = gen.model, gen.tok, beams
    srcs = [e["src"] for e in chunk]
    batch = on_device(model, gen.collate([{"src": s, "tgt": []} for s in srcs]))
    b, eos, longest = len(srcs), tok.sep_token_id, gen.spec.max_answer_tokens
    src, copyable, src_mask = batch["src"], batch["copyable"], batch["src_mask"]
    hs, h, cache = model.start(src, src_mask, tok.cls_token_id)
    lp = model.next_from_states(hs, h, src, copyable).float()
    allowed = torch.zeros_like(lp).scatter_add_(1, src, copyable.float()) > 0
    first_lp, first_tok = lp.masked_fill(~allowed, -math.inf).topk(k, -1)
    src, copyable, src_mask, hs = (x.repeat_interleave(k, 0) for x in (src, copyable, src_mask,
                                                                          hs))
    cache.batch_repeat_interleave(k)
    inside = torch.tensor([t.startswith("##") for t in tok.convert_ids_to_tokens(
        list(range(lp.shape[1])))], device=src.device)
    next_inside = torch.zeros_like(copyable)  # the next source token continues a word
    next_inside[:, :-1] = inside[src[:, 1:]] & copyable[:, 1:]
    y, score = first_tok.flatten(), first_lp.flatten()
    toks = [[int(t)] for t in y]
    ends = copyable & (src == y[:, None])  # positions where each hypothesis's span ends
    done: list[list[tuple[float, list[int], torch.Tensor]]] = [[] for _ in range(b)]
    for step in range(1, longest + 1):
        h, cache = model.step(y, cache, src_mask, step)
        lp = model.next_from_states(hs, h, src, copyable).float()
        nxt = torch.zeros_like(ends)
        nxt[:, 1:] = ends[:, :-1] & copyable[:, 1:]
        allowed = torch.zeros_like(lp).scatter_add_(1, src, nxt.float()) > 0
        allowed[:, eos] = (ends & ~next_inside).any(1)
        if step == longest:
            allowed[:] = False
            allowed[:, eos] = True
        vocab = lp.shape[1]
        total = (score[:, None] + lp.masked_fill(~allowed, -math.inf)).view(b, -1)
        best, idx = total.topk(2 * k, -1)
        rows, ys, scores = [], [], []
        for i in range(b):
            alive: list[tuple[int, int, float]] = []
            for rank, (s, j) in enumerate(zip(best[i].tolist(), idx[i].tolist(), strict=True)):
                if s == -math.inf or (len(alive) == k and rank >= k):
                    break
                row, t = i * k + j // vocab, j % vocab
                if t == eos:
                    if rank < k:  # a finished hypothesis among the k best
                        done[i].append((s / (len(toks[row]) + 1), toks[row], ends[row].clone()))
                elif len(alive) < k:
                    alive.append((row, t, s))
            alive += [(i * k, eos, -math.inf)] * (k - len(alive))  # dead fillers
            for row, t, s in alive:
                rows.append(row)
                ys.append(t)
                scores.append(s)
        score = torch.tensor(scores, device=src.device)
        if bool((score == -math.inf).all()):
            break
        y = torch.tensor(ys, device=src.device)
        cache.reorder_cache(torch.tensor(rows, device=src.device))
        ends = nxt[rows] & (src[rows] == y[:, None])
        toks = [toks[r] + [t] for r, t in zip(rows, ys, strict=True)]
    out = []
    for s, hyps in zip(srcs, done, strict=True):
        if not hyps:
            out.append(Prediction("", -1e9, -1, s.question_cut))
            continue
        mean, toks_i, ends_i = max(hyps, key=lambda x: x[0])
        text, passage = gen._copy_text(s, toks_i, ends_i)
        out.append(Prediction(text, mean, passage, s.question_cut))
    return out


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
    ap.add_argument("--beams", type=int, nargs="*", default=[2, 4])
    ap.add_argument("--limit", type=int, default=0, help="first N questions only (0: all)")
    args = ap.parse_args()
    cfg = load_config(args.root / "params.yaml")
    gc = cfg.generator
    gen = Generator.load(args.root / "artifacts/generator")
    if not isinstance(gen, CopyBackend):
        raise SystemExit("bench/decoding.py: the run's generator is not the copy kind")
    corpus = Corpus.load(args.root / "data/prepared/corpus.jsonl")
    rows = [r for r in read_jsonl(args.root / f"data/prepared/{args.split}.jsonl")
            if r.get("answers")]
    rows = rows[:args.limit] if args.limit else rows
    ret = {r["id"]: r for r in read_jsonl(args.root / f"artifacts/retrieved/{args.split}.jsonl")}
    questions = [r["question"] for r in rows]
    passages = [[corpus[p] for p in ret[r["id"]]["passage_ids"][:3]] for r in rows]
    scores = [ret[r["id"]]["scores"][:3] for r in rows]
    refs = [r["answers"] for r in rows]
    bf16 = runtime.use_bf16(gc.precision)
    greedy = CopyBackend._answer_batch
    print(f"{args.split}: {len(rows)} questions, top 3 passages each, answer_weight "
          f"{gc.answer_weight}")
    print(f"{'decoder':<22}{'top-1 EM / F1':>16}{'3 inputs EM / F1':>20}{'voting EM / F1':>18}"
          f"{'seconds':>9}")
    for beams in [0, 1, *args.beams]:
        if beams:
            CopyBackend._answer_batch = (  # type: ignore[method-assign]
                lambda self, chunk, decoding, k=beams: beam_batch(self, chunk, k))
        t0 = time.perf_counter()
        per_q = read_inputs(gen, questions, passages, n=3, per_input=1,
                            batch_size=gc.eval_batch_size, bf16=bf16)
        seconds = time.perf_counter() - t0
        CopyBackend._answer_batch = greedy  # type: ignore[method-assign]
        cells = [score_answers([q[0].answer for q in per_q], refs),
                 score_answers([p.answer for p in pick(per_q, scores, weight=gc.answer_weight)],
                               refs),
                 score_answers(vote(per_q, scores, gc.answer_weight), refs)]
        name = "greedy (ragtrain)" if not beams else f"beam search, {beams} beam(s)"
        print(f"{name:<22}" + "".join(f"{c['em']:>9.2f} / {c['f1']:5.2f}" for c in cells)
              + f"{seconds:>9.0f}")


if __name__ == "__main__":
    main()
