"""Which saved generator checkpoint, and which reading weight: scored on the whole split.

After `make demo` (or any finished run: --root), the copy generator's two saved checkpoints
under ``checkpoints/generator/`` -- the one `train_generator` kept (``best.safetensors``) and
the last step's (``last/model.safetensors``), optionally their uniform average -- answer every
question of the split from its top ``generator.answer_from`` retrieved passages with the run's
decoder, read the way `evaluate` reads (``generation.reading.pick``). For each checkpoint it
prints EM / F1 of the top input alone and of the kept answer for each ``--weights`` value.
Choose on dev; ``--split test`` only reads the choice off.

    python bench/checkpoints.py --root . [--split dev] [--average] [--limit N]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from ragtrain import runtime  # noqa: E402
from ragtrain.config import load_config  # noqa: E402
from ragtrain.data.corpus import Corpus  # noqa: E402
from ragtrain.data.questions import answered  # noqa: E402
from ragtrain.evaluation.answers import score_answers  # noqa: E402
from ragtrain.generation.generator import Generator  # noqa: E402
from ragtrain.generation.reading import pick, read_inputs  # noqa: E402
from ragtrain.pipeline.paths import (  # noqa: E402
    Paths,
    read_queries,
    read_retrieved,
    read_retrieved_scores,
)


def checkpoints(ckpt_dir: Path, average: bool) -> dict[str, dict[str, torch.Tensor]]:
    """name -> state dict: the kept and the last checkpoint (and their average)."""
    out = {"kept": load_file(str(ckpt_dir / "best.safetensors")),
           "last": load_file(str(ckpt_dir / "last" / "model.safetensors"))}
    if average:
        a, b = out["kept"], out["last"]
        out["average"] = {k: ((a[k].float() + b[k].float()) / 2).to(a[k].dtype)
                          if a[k].is_floating_point() else a[k] for k in a}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--root", type=Path, default=ROOT)
    ap.add_argument("--split", default="dev")
    ap.add_argument("--weights", type=float, nargs="+", default=[1.0, 2.0, 3.0, 4.0])
    ap.add_argument("--average", action="store_true", help="also the two averaged")
    ap.add_argument("--limit", type=int, default=0, help="first N questions only (0: all)")
    args = ap.parse_args()
    cfg = load_config(args.root / "params.yaml")
    gc, k = cfg.generator, cfg.retriever.top_k
    paths = Paths(args.root)
    gen = Generator.load(paths.generator)
    corpus = Corpus.load(paths.corpus)
    rows, _ = answered(read_queries(paths, args.split))
    rows = rows[:args.limit] if args.limit else rows
    ret, ret_scores = read_retrieved(paths, args.split), read_retrieved_scores(paths, args.split)
    n = gc.answer_from
    questions = [r["question"] for r in rows]
    passages = [[corpus[p] for p in ret[r["id"]][:n * k]] for r in rows]
    scores = [ret_scores[r["id"]] for r in rows]
    refs = [r["answers"] for r in rows]
    bf16 = runtime.use_bf16(gc.precision)
    print(f"{args.split}: {len(rows)} questions, {n} inputs of {k} passage(s), "
          f"{gc.num_beams} beam(s); EM / F1")
    print(f"{'checkpoint':<10}{'top input':>16}" + "".join(f"{f'weight {w:g}':>16}"
                                                     for w in args.weights) + f"{'seconds':>9}")
    for name, state in checkpoints(paths.generator_checkpoints, args.average).items():
        gen.model.load_state_dict(state)
        t0 = time.perf_counter()
        per_q = read_inputs(gen, questions, passages, n=n, per_input=k,
                            batch_size=gc.eval_batch_size, bf16=bf16)
        seconds = time.perf_counter() - t0
        cells = [score_answers([q[0].answer for q in per_q], refs)]
        cells += [score_answers([p.answer for p in pick(per_q, scores, weight=w, per_input=k,
                                                        null_weight=gc.answer_null_weight)],
                                refs) for w in args.weights]
        print(f"{name:<10}" + "".join(f"{c['em']:>8.2f} / {c['f1']:5.2f}" for c in cells)
              + f"{seconds:>9.0f}")


if __name__ == "__main__":
    main()
