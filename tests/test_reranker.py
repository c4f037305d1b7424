"""The cross-encoder reranker: its loss, candidates, fusion, training, save/load, resume, and
its stages (disabled marker; reranked rows in eval_retriever) on a tiny project."""

from __future__ import annotations

import dataclasses
import json
import math
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from ragtrain import cli
from ragtrain.config import Config, RerankerConfig, config_from_dict, load_config
from ragtrain.data.corpus import Corpus, Passage
from ragtrain.errors import ConfigError, RagtrainError, RetrievalError
from ragtrain.retrieval.bm25 import BM25Retriever
from ragtrain.retrieval.losses import listwise_softmax_ce
from ragtrain.retrieval.passage_text import passage_inputs
from ragtrain.retrieval.reranker import (
    Reranker,
    RerankerSpec,
    fuse_scores,
    lexical_windows,
    passage_texts,
)
from ragtrain.retrieval.reranker_training import (
    CandidateBatches,
    negative_pools,
    train_reranker,
    window_candidates,
)
from tests.conftest import FIXTURES, TINY_RETRIEVER_PARAMS, RecordingRun, tamper_safetensors

# ----------------------------------------------------------------- loss


def test_listwise_softmax_ce_matches_hand_computation() -> None:
    s = torch.tensor([[2.0, 1.0, 0.0], [0.0, 0.0, 3.0]])
    t = torch.tensor([0, 1])
    e = math.e
    # q0: -log(e^2 / (e^2 + e + 1)); q1: -log(1 / (2 + e^3))
    hand = (-math.log(e**2 / (e**2 + e + 1)) - math.log(1 / (2 + e**3))) / 2
    assert listwise_softmax_ce(s, t).item() == pytest.approx(hand, rel=1e-6)
    # a masked slot (no candidate there) leaves the softmax: q1 over columns 0, 1 only
    mask = torch.tensor([[False, False, False], [False, False, True]])
    hand_m = (-math.log(e**2 / (e**2 + e + 1)) + math.log(2)) / 2
    assert listwise_softmax_ce(s, t, mask).item() == pytest.approx(hand_m, rel=1e-6)
    # bf16 scores: computed in float, the same value within bf16 rounding of the inputs
    out = listwise_softmax_ce(s.bfloat16(), t)
    assert out.dtype == torch.float32 and out.item() == pytest.approx(hand, rel=1e-2)
    # gradient wrt the logits: (softmax - onehot) / Q
    g = s.clone().requires_grad_()
    listwise_softmax_ce(g, t).backward()
    expected = (torch.softmax(s, 1) - torch.nn.functional.one_hot(t, 3)) / 2
    assert torch.allclose(g.grad, expected, atol=1e-6)
    with pytest.raises(ValueError, match=r"expected scores \(Q, N\)"):
        listwise_softmax_ce(s[0], t)


def test_fuse_scores_by_hand() -> None:
    first = np.array([10.0, 8.0, 6.0, 5.0, 1.0])  # first-stage scores, best first
    rr = np.array([0.0, 4.0, 2.0])  # the reranker on the top 3
    fused, order = fuse_scores(rr, first, 0.5)
    # head: 0.5 * [0, 1, 0.5] + 0.5 * minmax(10, 8, 6) = 0.5 * [0, 1, 0.5] + 0.5 * [1, 0.5, 0];
    # the tail on the head's first-stage scale: 0.5 * (5 - 6) / 4, 0.5 * (1 - 6) / 4
    assert fused.tolist() == pytest.approx([0.5, 0.75, 0.25, -0.125, -0.625])
    assert order.tolist() == [1, 0, 2, 3, 4]
    alone, order = fuse_scores(rr, first, 1.0)
    assert order.tolist() == [1, 2, 0, 3, 4] and alone[3:].tolist() == [0.0, 0.0]
    assert fuse_scores(rr, first, 0.0)[1].tolist() == [0, 1, 2, 3, 4]  # the first stage alone
    with pytest.raises(RagtrainError, match="fuse_weight"):
        fuse_scores(rr, first, 1.5)


def test_config_checks_negatives_depth() -> None:
    with pytest.raises(ConfigError, match="negatives_depth: must be at least"):
        RerankerConfig(train_candidates=8, negatives_depth=3)
    with pytest.raises(ConfigError, match="window_stride: at most window_words"):
        RerankerConfig(window_words=4, window_stride=5)  # words between windows never read
    with pytest.raises(ConfigError, match="reranker.max_windows"):
        config_from_dict({"reranker": {"max_windows": -1}})
    assert Config().reranker.enabled is False  # off by default: nothing changes


# ----------------------------------------------------------------- candidates


def _toy() -> tuple[Corpus, list[dict], list[dict]]:
    topics = ["apple", "river", "castle", "violin", "rocket", "garden", "pirate", "glacier"]
    corpus = Corpus([Passage(f"p{i}", t.title(), f"A passage about the {t} and more about "
                             f"the {t}.") for i, t in enumerate(topics)])
    rows = [{"id": f"q{i}{j}", "question": f"{w} is said about the {t}?", "answers": [t],
             "gold_passage_ids": [f"p{i}"]}
            for i, t in enumerate(topics) for j, w in enumerate(["what", "which"])]
    return corpus, rows[::2], rows[1::2]


def _bm25(corpus: Corpus) -> BM25Retriever:
    return BM25Retriever.build(passage_inputs(corpus.passages), corpus.ids)


def test_false_negatives_never_reach_training_candidates() -> None:
    corpus = Corpus([Passage("g", "", "Paris is the capital of France."),
                     Passage("a", "", "The French capital, Paris, is large."),  # has the answer
                     Passage("g2", "", "Paris again: another gold passage."),
                     Passage("n1", "", "Berlin is the capital of Germany."),
                     Passage("n2", "", "Rome is the capital of Italy."),
                     Passage("n3", "", "Madrid is the capital of Spain.")])
    rows = [{"question": "What is the capital of France?", "answers": ["Paris"],
             "gold_passage_ids": ["g", "g2"]}]
    ranked = [["a", "g", "g2", "n2", "n1", "n3"]]
    pools = negative_pools(rows, ranked, corpus)
    assert pools == [["n2", "n1", "n3"]]  # gold and answer-bearing passages left out
    b = CandidateBatches(["g"], pools, [10], n_candidates=3, batch_questions=1, seed=0)
    seen = set()
    for i in range(20):  # 20 epochs of one batch: each draws its negatives anew
        ((row, cands),) = b(i)
        assert row == 0 and cands[0] == "g" and len(cands) == 3
        assert not {"a", "g2"} & set(cands) and len(set(cands)) == 3
        seen |= set(cands[1:])
    assert seen == {"n1", "n2", "n3"}
    assert b(7) == CandidateBatches(["g"], pools, [10], 3, 1, seed=0)(7)  # pure in (seed, i)


def test_batches_cover_each_question_once_per_epoch_grouped_by_length() -> None:
    n = 10
    b = CandidateBatches([f"g{i}" for i in range(n)], [[f"n{i}"] for i in range(n)],
                         lengths=list(range(n)), n_candidates=2, batch_questions=2, seed=3)
    assert b.per_epoch == 5
    epoch = [b(i) for i in range(5)]
    assert sorted(r for batch in epoch for r, _ in batch) == list(range(n))
    for batch in epoch:  # length-sorted within the pool: neighbours share a batch
        assert abs(batch[0][0] - batch[1][0]) == 1


# ----------------------------------------------------------------- model


@pytest.fixture()
def tiny_reranker(tiny_bert_dir: Path) -> Reranker:
    return Reranker.from_pretrained(RerankerSpec(str(tiny_bert_dir), max_length=64))


def test_new_head_found_and_attention_dropout_off(tiny_reranker: Reranker) -> None:
    assert tiny_reranker.new_params == ("model.classifier.bias", "model.classifier.weight")
    assert tiny_reranker.model.config.attention_probs_dropout_prob == 0.0
    assert tiny_reranker.model.config.num_labels == 1
    # the new head starts from the seed: a fresh model is the same model (resumable runs)
    spec = tiny_reranker.spec
    assert Reranker.from_pretrained(spec).fingerprint() == tiny_reranker.fingerprint()
    assert Reranker.from_pretrained(spec, seed=1).fingerprint() != tiny_reranker.fingerprint()


def test_training_forward_under_autocast_masks_in_its_dtype(tiny_reranker: Reranker) -> None:
    """The additive padding mask (models.autocast_padding_mask) is built in bf16 under bf16
    autocast; the logits are those of transformers' own fp32 mask within bf16 rounding, and
    without autocast the 2-D mask goes through as it is."""
    from ragtrain import models

    qs, ps = ["what river?", "who?"], ["a passage " * 20, "short"]
    enc = tiny_reranker.tokenize(qs, ps, padding=True)
    assert models.autocast_padding_mask(tiny_reranker.model, enc["attention_mask"]) is (
        enc["attention_mask"])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        mask = models.autocast_padding_mask(tiny_reranker.model, enc["attention_mask"])
        assert mask.dtype == torch.bfloat16 and mask.shape == (2, 1, 1, enc["input_ids"].shape[1])
        assert mask[1, 0, 0].eq(0).tolist() == enc["attention_mask"][1].bool().tolist()
        got = tiny_reranker.forward_pairs(qs, ps)
        want = tiny_reranker.model(**enc).logits[:, 0]
    torch.testing.assert_close(got.float(), want.float(), atol=2e-2, rtol=2e-2)
    assert models.autocast_padding_mask(torch.nn.Linear(2, 2), enc["attention_mask"]) is (
        enc["attention_mask"])  # not a BERT-style encoder: transformers builds its own


def test_score_batched_equals_one_by_one(tiny_reranker: Reranker) -> None:
    qs = ["what river?", "a much longer question with many more words in it " * 20]
    ps = [["short", "a passage " * 80, "mid size passage"], ["x", "y y y"]]
    batched = tiny_reranker.score(qs, ps, batch_size=2)
    single = [np.array([tiny_reranker.score([q], [[p]])[0][0] for p in plist])
              for q, plist in zip(qs, ps, strict=True)]
    for a, b in zip(batched, single, strict=True):
        assert a.shape == b.shape and np.allclose(a, b, atol=1e-5)


def test_a_windowed_passage_scores_its_best_window(tiny_reranker: Reranker) -> None:
    qs = ["what river?", "which castle?"]
    windows = ("Paris. the city lies", "Paris. lies on the Seine", "Paris. and is old")
    ps = [[windows, "Rome is old.", windows[1:]], [("x y", "castle z"), "w"]]
    got = tiny_reranker.score(qs, ps, batch_size=3)
    for q, plist, g in zip(qs, ps, got, strict=True):
        want = [max(float(tiny_reranker.score([q], [[w]])[0][0]) for w in
                    ([p] if isinstance(p, str) else p)) for p in plist]
        assert g.shape == (len(plist),) and np.allclose(g, want, atol=1e-5)
    assert not np.allclose(got[0][0], tiny_reranker.score(qs[:1], [[windows[0]]])[0][0])
    with pytest.raises(RetrievalError, match="no text to read"):
        tiny_reranker.score(qs[:1], [[()]])


def test_lexical_windows_by_hand() -> None:
    q = "Who built the Eiffel tower?"
    p1 = ("Paris. a city of lights", "Paris. the Eiffel tower was built", "Paris. built by Eiffel")
    p2 = ("Rome. old", "Rome. the tower")
    # question words in windows: p1 -> 0, 4 (the eiffel tower built), 2; p2 -> 0, 2; every
    # such word is in 2 of the 5 windows, so all weigh the same: the counts decide
    assert lexical_windows(q, [p1, p2], 1) == [[1], [1]]
    assert lexical_windows(q, [p1, p2], 2) == [[1, 2], [0, 1]]  # in passage order
    assert lexical_windows(q, [p1, p2], 0) == [[0, 1, 2], [0, 1]]  # 0: every window
    assert lexical_windows(q, [("x tower", "y tower")], 1) == [[0]]  # a tie: the earlier one
    # idf: "rare" (1 window of 5) outweighs "castle" (4 of 5), though each window has one word
    a, b = ("castle", "rare"), ("castle one", "castle two", "castle three")
    assert lexical_windows("rare castle", [a, b], 1) == [[1], [0]]
    assert lexical_windows("RARE castle?", [a, b], 1) == [[1], [0]]  # case and punctuation


def test_max_windows_reads_only_the_lexical_best(tiny_reranker: Reranker,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    qs = ["where does the river flow?", "which castle?"]
    windows = ("Paris. the city lies", "Paris. the river flows west", "Paris. a river",
               "Paris. and is old")
    ps = [[windows, "Rome is old.", windows[2:]], [("x y", "castle z", "castle w"), "w"]]
    read: list[tuple[str, str]] = []  # the (question, text) pairs the cross-encoder reads
    score_pairs = tiny_reranker._score_pairs

    def spy(q: list[str], p: list[str], *args: object) -> np.ndarray:
        read.extend(zip(q, p, strict=True))
        return score_pairs(q, p, *args)

    monkeypatch.setattr(tiny_reranker, "_score_pairs", spy)

    def one(q: str, text: str) -> float:
        return float(tiny_reranker.score([q], [[text]])[0][0])

    for n, want_read in ((1, [windows[1], "Rome is old.", windows[2], "castle z", "w"]),
                         (2, [windows[1], windows[0], "Rome is old.", *windows[2:], "castle z",
                              "castle w", "w"]),
                         (0, [*windows, "Rome is old.", *windows[2:], "x y", "castle z",
                              "castle w", "w"])):
        read.clear()
        got = tiny_reranker.score(qs, ps, batch_size=3, max_windows=n)
        assert sorted(p for _, p in read) == sorted(want_read), n
        for q, plist, g in zip(qs, ps, got, strict=True):
            texts = [[p] if isinstance(p, str) else list(p) for p in plist]
            want = [max(one(q, t[j]) for j in keep)
                    for t, keep in zip(texts, lexical_windows(q, texts, n), strict=True)]
            assert np.allclose(g, want, atol=1e-5)


def test_passage_texts_whole_or_as_windows(tiny_bert_dir: Path) -> None:
    corpus = Corpus([Passage("a", "Some_Title", "one two three four five six seven"),
                     Passage("b", "", "short text")])
    whole = passage_texts(corpus, RerankerSpec(str(tiny_bert_dir)))
    assert whole == {"a": ("Some Title. one two three four five six seven",),
                     "b": ("short text",)}
    win = passage_texts(corpus, RerankerSpec(str(tiny_bert_dir), window_words=4))
    assert win == {"a": ("Some Title. one two three four", "Some Title. three four five six",
                         "Some Title. five six seven"), "b": ("short text",)}


def test_window_candidates_positive_holds_the_answer_and_negatives_no_gold_window(
        tiny_bert_dir: Path) -> None:
    corpus = Corpus([
        Passage("g", "", "The city has many bridges. Its river is the Seine which flows west"),
        Passage("a", "", "Another text naming the Seine river again here"),  # holds the answer
        Passage("n1", "", "The river Thames flows through London city bridges"),
        Passage("n2", "", "A river in Rome is the Tiber flowing by the city"),
        # the answer in the title only: its windows do not hold it, so they may be negatives
        Passage("t", "Seine", "Which river flows through the city? Another one")])
    rows = [{"question": "Which river flows through the city?", "answers": ["Seine"],
             "gold_passage_ids": ["g"]},
            {"question": "Which river flows through the city?", "answers": ["Danube"],
             "gold_passage_ids": ["g"]}]  # no window holds it: the best BM25 gold window
    spec = RerankerSpec(str(tiny_bert_dir), window_words=6, window_stride=3)
    positives, pools, texts = window_candidates(rows, corpus, spec, _bm25(corpus), depth=20)
    assert set(texts) == {f"{pid}#{j}" for pid, t in passage_texts(corpus, spec).items()
                          for j in range(len(t))}
    assert "Seine" in texts[positives[0]] and positives[0].startswith("g#")
    assert all("Seine" not in texts[positives[0][:-1] + str(j)]
               for j in range(int(positives[0][-1])))  # the first window holding it
    windows = BM25Retriever.build(list(texts.values()), list(texts))
    s = windows.scores(rows[1]["question"])
    g_rows = [i for i, w in enumerate(texts) if w.startswith("g#")]
    assert positives[1] == list(texts)[max(g_rows, key=lambda i: s[i])]
    assert pools[0] and not any(w.startswith(("g#", "a#")) for w in pools[0])
    assert any(w.startswith("t#") for w in pools[0]) and texts["t#0"].startswith("Seine. ")
    assert not any(w.startswith("g#") for w in pools[1]) and any(w.startswith("a#")
                                                                 for w in pools[1])


def test_save_load_same_scores_and_fingerprint(tiny_reranker: Reranker, tmp_path: Path) -> None:
    tiny_reranker.save(tmp_path / "r")
    back = Reranker.load(tmp_path / "r")
    assert back.fingerprint() == tiny_reranker.fingerprint() and back.spec.max_length == 64
    assert back.spec.window_words == 0
    spec_file = tmp_path / "r/reranker.json"
    saved = json.loads(spec_file.read_text())
    spec_file.write_text(json.dumps({**saved, "window_words": 8, "window_stride": 2}))
    assert Reranker.load(tmp_path / "r").spec == dataclasses.replace(
        tiny_reranker.spec, window_words=8, window_stride=2)
    spec_file.write_text(json.dumps(saved))
    qs, ps = ["what river is Paris on?"], [["Paris lies on the Seine.", "Rome is old."]]
    assert np.array_equal(back.score(qs, ps)[0], tiny_reranker.score(qs, ps)[0])
    before = back.fingerprint()
    with torch.no_grad():
        back.model.classifier.bias.add_(1.0)
    assert back.fingerprint() != before
    # weights edited on disk after saving are refused
    tamper_safetensors(tmp_path / "r/model/model.safetensors")
    with pytest.raises(RagtrainError, match="do not match the fingerprint"):
        Reranker.load(tmp_path / "r")
    with pytest.raises(RagtrainError, match="reranker.json: missing"):
        Reranker.load(tmp_path / "nothing")


# ----------------------------------------------------------------- training + resume

CFG = RerankerConfig(enabled=True, max_length=48, window_words=0, candidates=4,
                     train_candidates=4,
                     negatives_depth=6, batch_questions=4, lr=1e-3, head_lr=1e-2,
                     warmup_ratio=0.0, max_steps=30, eval_every=10, checkpoint_every=2,
                     dev_questions=0, precision="fp32", eval_batch_size=16)


def _gold_rank(model: Reranker, corpus: Corpus, rows: list[dict],
               lists: list[list[str]] | None = None) -> float:
    """Mean rank of the gold passage by the reranker's score alone, among each question's
    ``lists`` (all passages when None)."""
    texts = passage_texts(corpus, model.spec)
    lists = lists or [list(texts)] * len(rows)
    s = model.score([r["question"] for r in rows], [[texts[p] for p in row] for row in lists])
    return float(np.mean([1 + int((si > si[row.index(r["gold_passage_ids"][0])]).sum())
                          for si, row, r in zip(s, lists, rows, strict=True)]))


@pytest.mark.parametrize("window_words", [0, 4])
def test_training_ranks_gold_higher(tiny_bert_dir: Path, tmp_path: Path,
                                    window_words: int) -> None:
    """A few steps of a tiny random BERT put the gold passage first among its question's
    candidates (the loss pushes it above its negatives), read whole or as 4-word windows (each
    passage 4 of them; trained on windows, ranked by the best). So few steps teach a random
    model priors, not question-passage matching: the slow MiniLM test below shows matching."""
    corpus, train, dev = _toy()
    cfg = dataclasses.replace(CFG, model_name=str(tiny_bert_dir), lr=5e-3, head_lr=5e-2,
                              max_steps=10, eval_every=5, batch_questions=1,
                              window_words=window_words)
    bm25 = _bm25(corpus)
    model = Reranker.from_pretrained(RerankerSpec.from_config(cfg))
    texts = passage_texts(corpus, model.spec)
    assert {len(t) for t in texts.values()} == {4 if window_words else 1}
    lists = [[r["gold_passage_ids"][0], *pool] for r, pool in zip(train, negative_pools(
        train, bm25.search([r["question"] for r in train], 6)[1], corpus), strict=True)]
    ranks = [_gold_rank(model, corpus, [r], [row[:4]]) for r, row in zip(train, lists,
                                                                         strict=True)]
    q = next(i for i, x in enumerate(ranks) if x > 1)  # one the untrained model ranks wrong
    log: list = []
    state = train_reranker(model, corpus, [train[q]], dev, cfg, bm25=bm25, seed=0,
                           ckpt_dir=tmp_path / "ck", on_step=lambda s, d: log.append(dict(d)),
                           progress=False)
    assert state.step == 10
    assert _gold_rank(model, corpus, [train[q]], [lists[q][:4]]) == 1.0 < ranks[q]
    losses = [d["train/loss"] for d in log if "train/loss" in d]
    if not window_words:  # (windows: each step draws other negative windows, a noisy curve)
        assert losses[-1] < losses[0]
    evals = [d for d in log if "dev/recall_at_1" in d]
    assert len(evals) == 2 and {"dev/alone/recall_at_1", "dev/first_stage/recall_at_1",
                                "dev/mrr_at_4"} <= set(evals[0])
    assert len(texts) == 8


@pytest.mark.slow
def test_minilm_reranker_learns_to_match(tmp_path: Path) -> None:
    """The bundled MiniLM with a new head: 16 steps take the gold passage's mean rank over the
    whole toy corpus from ~4.4 (chance: 4.5) to 1 (~1 min on 2 busy CPU cores)."""
    corpus, train, dev = _toy()
    cfg = dataclasses.replace(CFG, model_name="all-MiniLM-L6-v2", lr=5e-5, head_lr=2e-3,
                              max_steps=16, eval_every=0, train_candidates=8,
                              negatives_depth=8)
    model = Reranker.from_pretrained(RerankerSpec.from_config(cfg))
    before = _gold_rank(model, corpus, train)
    train_reranker(model, corpus, train, dev, cfg, bm25=_bm25(corpus), seed=0,
                   ckpt_dir=tmp_path / "ck", progress=False)
    after = _gold_rank(model, corpus, train)
    assert before > 3 and after <= 1.5, (before, after)


@pytest.mark.parametrize("window_words", [0, 4])
def test_resume_reaches_the_same_weights(tiny_bert_dir: Path, tmp_path: Path,
                                         window_words: int) -> None:
    corpus, train, dev = _toy()
    cfg = dataclasses.replace(CFG, model_name=str(tiny_bert_dir), max_steps=6, eval_every=3,
                              batch_questions=2, window_words=window_words)

    def fresh() -> Reranker:
        return Reranker.from_pretrained(RerankerSpec.from_config(cfg))

    full = fresh()
    train_reranker(full, corpus, train, dev, cfg, bm25=_bm25(corpus), seed=0,
                   ckpt_dir=tmp_path / "a", progress=False)

    class Killed(Exception):
        pass

    def kill_at_5(step: int, logs: dict) -> None:
        if step == 5 and "train/loss" in logs:
            raise Killed

    with pytest.raises(Killed):  # killed after step 5; the last checkpoint is step 4
        train_reranker(fresh(), corpus, train, dev, cfg, bm25=_bm25(corpus), seed=0,
                       ckpt_dir=tmp_path / "b", on_step=kill_at_5, progress=False)
    resumed, steps = fresh(), []
    train_reranker(resumed, corpus, train, dev, cfg, bm25=_bm25(corpus), seed=0,
                   ckpt_dir=tmp_path / "b", resume=True, progress=False,
                   on_step=lambda s, d: steps.append(s) if "train/loss" in d else None)
    assert steps == [5, 6]
    assert resumed.fingerprint() == full.fingerprint()


# ----------------------------------------------------------------- stages


def test_disabled_stage_writes_its_marker_only(tmp_path: Path,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    from transformers import AutoModelForSequenceClassification

    from ragtrain.pipeline.paths import Paths
    from ragtrain.pipeline.reranking import run_train_reranker

    def no_model(*a: object, **k: object) -> None:
        raise AssertionError("the disabled stage loaded a model")

    monkeypatch.setattr(AutoModelForSequenceClassification, "from_pretrained", no_model)
    t0 = time.perf_counter()
    m = run_train_reranker(Config(), Paths(tmp_path))  # no data at all: none is read
    assert time.perf_counter() - t0 < 0.5
    files = sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*") if p.is_file())
    # the marker, plus the metrics and plot files dvc.yaml declares (DVC requires them)
    assert files == ["artifacts/reranker/DISABLED.json", "metrics/train_reranker.json",
                     "plots/train_reranker.json"]
    assert json.loads((tmp_path / files[0]).read_text())["enabled"] is False
    assert m == {"reranker/enabled": 0, "train/steps": 0}
    assert json.loads((tmp_path / files[2]).read_text()) == []


RERANKER_SECTION = """reranker:
  enabled: {enabled}
  model_name: {bert}
  max_length: 64
  candidates: 3
  train_candidates: 3
  negatives_depth: 4
  batch_questions: 2
  max_steps: 2
  checkpoint_every: 1
  dev_questions: 0
  precision: fp32
"""
RERANK_PARAMS = TINY_RETRIEVER_PARAMS + RERANKER_SECTION + """evaluation:
  recall_ks: [1, 2, 5]
  rank_cutoff: 3
tracking:
  enabled: false
"""


@pytest.fixture()
def rerank_project(tmp_path: Path, tiny_bert_dir: Path,
                   monkeypatch: pytest.MonkeyPatch) -> Path:
    (tmp_path / "params.yaml").write_text(RERANK_PARAMS.format(
        source=FIXTURES / "tiny_jsonl", bert=tiny_bert_dir, enabled="false"))
    monkeypatch.chdir(tmp_path)
    for stage in ("fetch", "prepare", "build-bm25", "train-retriever", "build-index",
                  "train-reranker", "eval-retriever"):
        assert cli.main([stage]) == 0, stage
    return tmp_path


def _log_train_reranker(params: Path) -> dict:
    from ragtrain.pipeline import tracked
    from ragtrain.pipeline.paths import Paths

    run = RecordingRun()
    result = json.loads((params.parent / "metrics/train_reranker.json").read_text())
    tracked.log_train_reranker(run, load_config(params), Paths(params.parent), result)
    return vars(run)


def test_eval_retriever_reports_reranked_rows(rerank_project: Path,
                                              capsys: pytest.CaptureFixture) -> None:
    off = json.loads((rerank_project / "metrics/retriever.json").read_text())
    assert not any("reranked" in k for k in off)
    params = rerank_project / "params.yaml"
    logged = _log_train_reranker(params)  # disabled: the marker and its metrics, no curve
    assert logged["metrics"] == {"reranker/enabled": 0.0, "train/steps": 0.0}
    assert logged["dicts"]["reranker_disabled.json"]["enabled"] is False
    params.write_text(params.read_text().replace("enabled: false", "enabled: true", 1))
    assert load_config(params).reranker.enabled
    capsys.readouterr()
    assert cli.main(["eval-retriever"]) == 2  # the disabled marker is not a reranker
    assert "DISABLED.json: reranker.enabled is true but no reranker" in capsys.readouterr().err

    assert cli.main(["train-reranker"]) == 0
    assert (rerank_project / "artifacts/reranker/reranker.json").exists()
    logged = _log_train_reranker(params)  # what the stage's MLflow run gets
    assert logged["metrics"]["train/steps"] == 2.0 and logged["metrics"]["reranker/enabled"] == 1
    assert "reranker.json" in logged["dicts"] and logged["artifacts"] == [
        ("train_reranker.json", None), ("train_reranker_loss.png", "plots")]
    assert not (rerank_project / "artifacts/reranker/DISABLED.json").exists()
    assert json.loads((rerank_project / "metrics/train_reranker.json").read_text())[
        "train/steps"] == 2
    assert cli.main(["eval-retriever"]) == 0
    assert "reranked" in capsys.readouterr().out
    on = json.loads((rerank_project / "metrics/retriever.json").read_text())
    rows = [json.loads(x) for x in open(rerank_project / "artifacts/eval/retriever_test.jsonl")]
    assert rows and "reranked_gold_rank" in rows[0]
    for k in (1, 2, 5):  # recomputed from the per-question ranks
        ranks = [r["reranked_gold_rank"] for r in rows if r["gold_passage_ids"]]
        assert on[f"test/reranked/recall_at_{k}"] == sum(
            x is not None and x <= k for x in ranks) / len(ranks)
        assert on[f"test/recall_at_{k}"] == on[f"test/reranked/recall_at_{k}"]  # what RAG uses
    # the other retrievers' rows are untouched by reranking
    assert {k: v for k, v in on.items() if k.count("/") == 2} == {
        **{k: v for k, v in off.items() if k.count("/") == 2},
        **{k: v for k, v in on.items() if k.startswith("test/reranked/")}}

    assert cli.main(["retrieve"]) == 0
    got = [json.loads(x) for x in open(rerank_project / "artifacts/retrieved/test.jsonl")]
    assert len(got[0]["passage_ids"]) == 5 and got[0]["scores"] == sorted(
        got[0]["scores"], reverse=True)
    assert got[0]["passage_ids"][:2] == rows[0]["top_ids"][:2]  # the same reranked order
