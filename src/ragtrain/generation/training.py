"""Generator training by maximum likelihood on retrieved passages (as RAG trains it).

Each training example is a question with its top-k retrieved passages; in a configurable share of
examples (``gold_share``) the gold passage is forced in (replacing the lowest-ranked one, at a
random slot) so the generator sees the answer often enough to learn to copy it, and learns to
ignore distractors the rest of the time. A training input that still holds neither the gold
passage nor the answer's text (a retrieval miss, ~6% of SQuAD's) is taught the empty answer
(``missed_target: empty``, as SQuAD 2.0 readers learn "no answer"): taught the reference answer
instead, the model learns to be as sure of a span copied from a wrong passage as from the right
one, and the best of several inputs (``generation/reading.py``) cannot be told apart. The data
order and the forcing are fixed by the seed and the epoch, so a resumed run sees the same batches
as an uninterrupted one.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from ragtrain import distributed, runtime
from ragtrain.config import GeneratorConfig
from ragtrain.data.corpus import Passage
from ragtrain.evaluation.answers import score_answers
from ragtrain.generation.generator import Example, Generator, Prediction
from ragtrain.generation.inputs import holds_answer
from ragtrain.trainer import LoopConfig, TrainState, build_optimizer, train_loop


def passages_of(ids: Sequence[str], corpus: Mapping[str, Passage]) -> list[Passage]:
    return [corpus[p] for p in ids]


def missed(passages: Sequence[Passage], gold: Sequence[str], answer: str) -> bool:
    """Whether an input lacks the answer: the gold passage is known and not among the
    passages, and no passage ``holds_answer`` (so what is not a miss is what the copy model can
    copy)."""
    ids = {p.passage_id for p in passages}
    return bool(gold) and not ids & set(gold) and not any(holds_answer(p.text, answer)
                                                          for p in passages)


def make_examples(rows: Sequence[Mapping[str, Any]], retrieved: Mapping[str, Sequence[str]],
                  corpus: Mapping[str, Passage], top_k: int, *, gold_share: float = 0.0,
                  rng: random.Random | None = None, missed_target: str = "answer"
                  ) -> list[Example]:
    """Question + top-k retrieved passages (+ the first reference answer); with probability
    ``gold_share`` the gold passage is forced in when retrieval missed it; with
    ``missed_target: empty`` an input that lacks the answer (``missed``) gets the answer ""."""
    out = []
    for r in rows:
        ids = list(retrieved[r["id"]][:top_k])
        gold = r.get("gold_passage_ids") or []
        if rng is not None and gold and gold_share > 0 and rng.random() < gold_share:
            if not set(gold) & set(ids):
                slot = rng.randrange(len(ids)) if ids else 0
                ids = ids[:slot] + ids[slot + 1:]
                ids.insert(rng.randrange(len(ids) + 1), gold[0])
        passages, answer = passages_of(ids, corpus), (r.get("answers") or [""])[0]
        if missed_target == "empty" and missed(passages, gold, answer):
            answer = ""
        out.append(Example(r["question"], passages, answer))
    return out


def length_grouped(encoded: list[dict[str, Any]], batch_size: int, rng: random.Random,
                   length: Callable[[dict[str, Any]], int], pool: int = 50
                   ) -> list[dict[str, Any]]:
    """Reorder (already shuffled) examples so each batch holds similar lengths (less padding):
    within pools of ``pool`` batches, sort by length and cut into batches; then shuffle the
    batches. Deterministic given ``rng``."""
    batches: list[list[dict[str, Any]]] = []
    step = pool * batch_size
    for start in range(0, len(encoded), step):
        chunk = sorted(encoded[start:start + step], key=length)
        batches += [chunk[i:i + batch_size] for i in range(0, len(chunk), batch_size)]
    full = [b for b in batches if len(b) == batch_size]
    rng.shuffle(full)
    return [x for b in full + [b for b in batches if len(b) < batch_size] for x in b]


def epoch_examples(gen: Generator, train_rows: Sequence[Mapping[str, Any]],
                   retrieved: Mapping[str, Sequence[str]], corpus: Mapping[str, Passage],
                   cfg: GeneratorConfig, *, top_k: int, seed: int, epoch: int
                   ) -> list[dict[str, Any]]:
    """The encoded training examples of ``epoch`` in the order ``train_generator`` reads them
    (shuffled, gold passages forced in, length-grouped into batches), fixed by the seed and
    the epoch."""
    rng = random.Random(seed * 7919 + epoch)
    order = list(range(len(train_rows)))
    rng.shuffle(order)
    exs = make_examples([train_rows[i] for i in order], retrieved, corpus, top_k,
                        gold_share=cfg.gold_share, rng=rng, missed_target=cfg.missed_target)
    return length_grouped([gen.encode(x) for x in exs], cfg.batch_size, rng,
                          length=gen.source_length)


def gold_examples(rows: Sequence[Mapping[str, Any]], corpus: Mapping[str, Passage]
                  ) -> list[Example]:
    """The gold passage alone (the contrast figure: generation without retrieval errors)."""
    return [Example(r["question"], passages_of(r["gold_passage_ids"][:1], corpus),
                    (r.get("answers") or [""])[0]) for r in rows]


def evaluate_generator(gen: Generator, examples: Sequence[Example],
                       references: Sequence[Sequence[str]], *, batch_size: int, bf16: bool,
                       prefix: str, progress: bool = False
                       ) -> tuple[dict[str, float], list[Prediction]]:
    preds = gen.answer(examples, batch_size, bf16=bf16, progress=progress)
    m = score_answers([p.answer for p in preds], references)
    return {f"{prefix}/{k}": v for k, v in m.items()}, preds


def train_generator(
    gen: Generator,
    train_rows: Sequence[Mapping[str, Any]],
    dev_rows: Sequence[Mapping[str, Any]],
    retrieved: Mapping[str, Sequence[str]],
    corpus: Mapping[str, Passage],
    cfg: GeneratorConfig,
    *,
    top_k: int,
    seed: int,
    ckpt_dir: Path,
    resume: bool,
    signature: str,
    on_step: Callable[[int, Mapping[str, float]], None] | None = None,
    progress: bool = True,
) -> TrainState:
    """Fine-tune ``gen`` on ``train_rows``; it ends holding the best dev-F1 weights."""
    bs = cfg.batch_size
    n_batches = max(1, len(train_rows) // bs)  # drop the last partial batch: fixed shapes
    per_epoch = n_batches // cfg.grad_accum_steps
    total = cfg.max_steps or per_epoch * cfg.epochs
    amp = runtime.amp_dtype(cfg.precision)  # training autocast: bf16, fp16 (loss scaled) or none
    bf16 = amp == torch.bfloat16  # dev answering
    epochs: dict[int, list[dict[str, Any]]] = {}

    def epoch_data(e: int) -> list[dict[str, Any]]:
        """Epoch ``e``'s examples (built once per epoch)."""
        if e not in epochs:
            epochs.clear()
            epochs[e] = epoch_examples(gen, train_rows, retrieved, corpus, cfg, top_k=top_k,
                                       seed=seed, epoch=e)
        return epochs[e]

    def loss_fn(micro: int) -> tuple[torch.Tensor, int]:
        e, b = divmod(micro, n_batches)
        chunk = epoch_data(e)[b * bs:(b + 1) * bs]
        if distributed.world_size() > 1:  # this rank's share, weighed by its answer tokens
            batch = gen.collate(distributed.shard(chunk))
            with runtime.autocast(amp):
                return gen.loss(batch), int(distributed.weight(len(chunk),
                                                               gen.target_tokens(batch)))
        with runtime.autocast(amp):
            return gen.loss(gen.collate(chunk)), len(chunk)

    rng = random.Random(seed)
    dev_sample = list(dev_rows)
    if cfg.dev_questions and len(dev_sample) > cfg.dev_questions:
        dev_sample = rng.sample(dev_sample, cfg.dev_questions)
    dev_examples = make_examples(dev_sample, retrieved, corpus, top_k)
    dev_refs = [r["answers"] for r in dev_sample]

    def evaluate() -> dict[str, float]:
        m, _ = evaluate_generator(gen, dev_examples, dev_refs, batch_size=cfg.eval_batch_size,
                                  bf16=bf16, prefix="dev")
        return m

    loop = LoopConfig(total_steps=total, lr=cfg.lr, weight_decay=cfg.weight_decay,
                      warmup_ratio=cfg.warmup_ratio, grad_clip=cfg.grad_clip,
                      grad_accum_steps=cfg.grad_accum_steps,
                      checkpoint_every=cfg.checkpoint_every, eval_every=cfg.eval_every,
                      patience=cfg.early_stopping_patience, seed=seed, progress=progress,
                      fp16=amp == torch.float16)
    opt = build_optimizer(gen.model, cfg.lr, cfg.weight_decay,
                          {p: cfg.new_params_lr for p in gen.new_param_prefixes()})
    return train_loop(gen.model, loss_fn, loop, ckpt_dir=ckpt_dir, signature=signature,
                      resume=resume, evaluate=evaluate if dev_examples else None,
                      select_metric="dev/f1", on_step=on_step,
                      optimizer=opt)
