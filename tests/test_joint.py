"""Joint RAG training (train_rag): the marginal losses by hand, their k = 1 reduction to the
generator's own loss, where gradients go, resume, and the disabled stage's marker."""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from ragtrain import cli, runtime
from ragtrain.config import Config, GeneratorConfig, JointConfig, load_config
from ragtrain.data.corpus import Passage
from ragtrain.generation.generator import Example, Generator
from ragtrain.generation.joint import FixedPassages, JointRAG
from ragtrain.generation.marginal import get_marginal, rag_sequence_loss, rag_token_loss
from ragtrain.pipeline import tracked
from ragtrain.pipeline.joint import run_train_rag
from ragtrain.pipeline.paths import Paths
from tests.conftest import Crash, RecordingRun, crash_at

# ----------------------------------------------------------------- the losses, by hand


def _tiny_inputs() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Two questions, k = 2 passages, answers of 2 and 1 tokens (the second one padded)."""
    doc = torch.tensor([[0.75, 0.25], [0.5, 0.5]]).log()  # p(z | x)
    tok = torch.tensor([[[0.5, 0.4], [0.2, 0.9]],  # p(y_t | x, z, y_<t)
                        [[0.6, 0.123], [0.2, 0.456]]]).log()  # last column of q2: padding
    mask = torch.tensor([[True, True], [True, False]])
    return doc, tok, mask


def test_rag_sequence_loss_by_hand() -> None:
    # q1: 0.75 * 0.5 * 0.4 + 0.25 * 0.2 * 0.9 = 0.195; q2: 0.5 * 0.6 + 0.5 * 0.2 = 0.4; 3 tokens
    want = -(math.log(0.195) + math.log(0.4)) / 3
    assert rag_sequence_loss(*_tiny_inputs()).item() == pytest.approx(want, rel=1e-6)


def test_rag_token_loss_by_hand() -> None:
    # q1: t1 0.75 * 0.5 + 0.25 * 0.2 = 0.425, t2 0.75 * 0.4 + 0.25 * 0.9 = 0.525; q2: 0.4
    want = -(math.log(0.425) + math.log(0.525) + math.log(0.4)) / 3
    assert rag_token_loss(*_tiny_inputs()).item() == pytest.approx(want, rel=1e-6)


def test_marginal_shapes_are_checked() -> None:
    doc, tok, mask = _tiny_inputs()
    with pytest.raises(ValueError, match="expected"):
        rag_token_loss(doc[:, :1], tok, mask)
    with pytest.raises(ValueError, match="marginal 'both'"):
        get_marginal("both")


# ----------------------------------------------------------------- on tiny models

PASSAGES = [Passage("d1", "Paris", "Paris is the capital of France. It lies on the Seine."),
            Passage("d2", "Berlin", "Berlin is the capital of Germany. The Spree flows."),
            Passage("d3", "Rome", "Rome is the capital of Italy. The Tiber runs through it.")]
ROWS = [{"question": "What river is Paris on?", "answers": ["the Seine"],
         "gold_passage_ids": ["d1"]},
        {"question": "Which river runs through Rome?", "answers": ["Tiber"],
         "gold_passage_ids": ["d3"]}]


def _generator(tiny_bert_dir: Path) -> Generator:
    torch.manual_seed(0)
    return Generator.from_pretrained(GeneratorConfig(model_name=str(tiny_bert_dir),
                                                     max_source_tokens=96, max_answer_tokens=8))


@pytest.mark.parametrize("marginal", ["sequence", "token"])
def test_k1_reduces_to_the_generators_plain_loss(tiny_bert_dir: Path, marginal: str) -> None:
    gen = _generator(tiny_bert_dir)
    gen.model.eval()  # no dropout: the two computations see the same network
    exs = [Example("What river is Paris on?", [PASSAGES[0]], "the Seine"),
           Example("Which river runs through Rome?", [PASSAGES[1]], "Tiber")]  # not in it
    with torch.no_grad():
        plain = gen.loss(gen.collate([gen.encode(e) for e in exs]))
        lp, mask = gen.passage_log_probs(exs)
        assert lp.shape[:2] == (2, 1) and mask.shape == (2, lp.shape[2])
        got = get_marginal(marginal)(torch.zeros(2, 1), lp, mask)
        assert got.item() == pytest.approx(plain.item(), rel=1e-5)
        # the same passage twice, any p(z|x): a mixture of one distribution is that distribution
        twice = [Example(e.question, e.passages * 2, e.answer) for e in exs]
        lp2, mask2 = gen.passage_log_probs(twice)
        doc = torch.tensor([[0.3, 0.7], [0.9, 0.1]]).log()
        assert get_marginal(marginal)(doc, lp2, mask2).item() == pytest.approx(plain.item(),
                                                                              rel=1e-5)


def test_gradient_reaches_query_encoder_and_generator_not_passage_side(
        tiny_bert_dir: Path) -> None:
    from ragtrain.retrieval.encoder import BiEncoder, EncoderSpec
    from ragtrain.retrieval.passage_text import passage_inputs

    torch.manual_seed(0)
    retriever = BiEncoder.from_pretrained(EncoderSpec(str(tiny_bert_dir)))  # shared towers
    emb = torch.from_numpy(retriever.encode_passages(passage_inputs(PASSAGES)))
    gen = _generator(tiny_bert_dir)
    rag = JointRAG(copy.deepcopy(retriever.query_tower), retriever.tokenizer, 32, gen,
                   FixedPassages([p.passage_id for p in PASSAGES], emb),
                   {p.passage_id: p for p in PASSAGES},
                   JointConfig(top_k=2, cosine_weight=0.5, marginal="token"))
    loss = rag.loss(ROWS)
    assert torch.isfinite(loss)
    loss.backward()
    q_grads = {n: p.grad for n, p in rag.model.query.named_parameters()
               if ".pooler." not in n}  # the pooler is unused (mean pooling)
    assert all(g is not None for g in q_grads.values()), [n for n, g in q_grads.items()
                                                          if g is None]
    assert all(g.abs().sum() > 0 for n, g in q_grads.items() if "layer.0." in n)
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in gen.model.parameters())
    # the passage side: the tower that embedded the passages, and the embeddings, get nothing
    assert all(p.grad is None for p in retriever.parameters())
    assert not rag.passages.emb.requires_grad and rag.passages.emb.grad is None


def test_no_cosine_term_leaves_the_marginal_alone(tiny_bert_dir: Path) -> None:
    """The gradient reaching the query encoder comes through p(z|x) alone when the auxiliary
    term is off (with k = 1 there is nothing to marginalise: no gradient at all)."""
    from ragtrain.retrieval.encoder import BiEncoder, EncoderSpec
    from ragtrain.retrieval.passage_text import passage_inputs

    torch.manual_seed(0)
    retriever = BiEncoder.from_pretrained(EncoderSpec(str(tiny_bert_dir)))
    emb = torch.from_numpy(retriever.encode_passages(passage_inputs(PASSAGES)))
    rag = JointRAG(retriever.query_tower, retriever.tokenizer, 32, _generator(tiny_bert_dir),
                   FixedPassages([p.passage_id for p in PASSAGES], emb),
                   {p.passage_id: p for p in PASSAGES}, JointConfig(top_k=1))
    rag.loss(ROWS).backward()
    assert all(p.grad is None or p.grad.abs().sum() == 0 for p in retriever.parameters())


def test_fixed_passages_score_each_passage_by_its_best_window(tmp_path: Path) -> None:
    """With windows (a passage's id on several rows) the top-k are k distinct passages ranked by
    their best row, each given by that row; the index path and the exact path agree."""
    from ragtrain.config import IndexConfig
    from ragtrain.retrieval.index import build_index

    rng = np.random.default_rng(0)
    ids = ["a", "a", "b", "c", "c", "c", "d"]
    emb = rng.standard_normal((7, 8)).astype(np.float32)
    q = rng.standard_normal((5, 8)).astype(np.float32)
    idx = build_index(emb, ids, IndexConfig(kind="flat", device="cpu", window_words=4),
                      corpus_sha256="", encoder_fingerprint="")
    for index in (None, idx):
        fixed = FixedPassages(ids, torch.from_numpy(emb), index)
        assert fixed.n_passages == 4
        for k in (1, 2, 4):
            rows = fixed.top(q, k)
            for qi, row in zip(q, rows, strict=True):  # brute force MaxP
                scores = emb @ qi
                best = {pid: max(range(7), key=lambda j, pid=pid: scores[j] if ids[j] == pid
                                 else -np.inf) for pid in set(ids)}
                want = sorted(best, key=lambda pid: -scores[best[pid]])[:k]
                assert row == [best[pid] for pid in want]
    with pytest.raises(ValueError, match="'a': its rows are not one run"):
        FixedPassages(["a", "b", "a"], torch.zeros(3, 2))


def test_windows_repeating_a_passage_vector_change_nothing(tiny_bert_dir: Path) -> None:
    """Each passage's vector on three rows (three identical windows): the same retrieval, the
    same joint loss, the same gradient as one row each; and the distinct passages are what the
    generator reads."""
    from ragtrain.retrieval.encoder import BiEncoder, EncoderSpec
    from ragtrain.retrieval.passage_text import passage_inputs

    torch.manual_seed(0)
    retriever = BiEncoder.from_pretrained(EncoderSpec(str(tiny_bert_dir)))
    emb = torch.from_numpy(retriever.encode_passages(passage_inputs(PASSAGES)))
    ids = [p.passage_id for p in PASSAGES]
    gen = _generator(tiny_bert_dir)
    gen.model.eval()
    cfg = JointConfig(top_k=2, cosine_weight=0.5)
    out = []
    for fixed in (FixedPassages(ids, emb),
                  FixedPassages([i for i in ids for _ in range(3)], emb.repeat_interleave(3, 0))):
        rag = JointRAG(copy.deepcopy(retriever.query_tower), retriever.tokenizer, 32, gen,
                       fixed, {p.passage_id: p for p in PASSAGES}, cfg)
        gen.model.zero_grad()
        loss = rag.loss(ROWS)
        loss.backward()
        grad = torch.cat([p.grad.flatten() for p in rag.model.query.parameters()
                          if p.grad is not None])
        ranked = rag.retrieve([r["question"] for r in ROWS], 3)
        assert all(sorted(r) == sorted(ids) for r in ranked)  # each passage once
        with runtime.autocast(True):  # as the stage evaluates under bf16
            assert all(sorted(r) == sorted(ids)
                       for r in rag.retrieve([r["question"] for r in ROWS], 3))
        out.append((loss.item(), grad, ranked))
    assert out[1][0] == pytest.approx(out[0][0], rel=1e-6)
    assert torch.allclose(out[1][1], out[0][1], atol=1e-6)
    assert out[1][2] == out[0][2]


# ----------------------------------------------------------------- the stage


JOINT_PARAMS = """joint:
  enabled: true
  top_k: 2
  batch_size: 2
  max_steps: 4
  checkpoint_every: 1
  precision: fp32
  dev_questions: 0
  eval_batch_size: 4
  eval_at_start: false  # the trained weights, whatever dev says of the starting pair
"""


def _windows(project: Path, words: int) -> None:
    """Passages as windows of ``words`` words (0: one vector each), the stages before the joint
    one rerun over them (the tiny passages fit one default window)."""
    from ragtrain.config import set_params

    set_params(project / "params.yaml", {"index.window_words": words,
                                         "index.window_stride": words // 2})
    for stage in ("build-index", "retrieve", "evaluate"):
        assert cli.main([stage]) == 0, stage


@pytest.mark.parametrize("window_words", [0, 6])
def test_joint_stage_trains_evaluates_and_resumes_to_the_same_weights(
        tiny_rag_project: Path, window_words: int) -> None:
    p = tiny_rag_project
    _windows(p, window_words)
    (p / "params.yaml").write_text((p / "params.yaml").read_text() + JOINT_PARAMS)
    assert cli.main(["train-rag"]) == 0
    out = p / "artifacts/rag_joint"
    assert {x.name for x in out.iterdir()} == {"retriever", "generator", "joint.json"}
    m = json.loads((p / "metrics/train_rag.json").read_text())
    assert m["train/steps"] == 4 and m["joint/enabled"] == 1
    for name in ("joint", "pipeline"):
        for key in ("dev/{}/recall_at_1", "dev/{}/recall_at_5", "test/{}/recall_at_1",
                    "test/{}/recall_at_5", "test/{}/em", "test/{}/f1"):
            assert 0 <= m[key.format(name)] <= 100, key.format(name)
    # as the RAG model retrieves (hybrid, retriever.top_k passages): the pipeline pair scores
    # what the evaluate stage measured
    assert 0 <= m["test/joint_hybrid/em"] <= 100 and "dev/joint_hybrid/recall_at_1" in m
    gen_metrics = json.loads((p / "metrics/generator.json").read_text())
    assert m["test/pipeline_hybrid/em"] == gen_metrics["test/em"]
    assert m["test/pipeline_hybrid/f1"] == pytest.approx(gen_metrics["test/f1"], abs=1e-3)
    assert len(json.loads((p / "plots/train_rag.json").read_text())) == 4
    # the passage tower is the pipeline's: the embeddings and index still fit the joint model
    pipe = load_file(str(p / "artifacts/retriever/query/model.safetensors"))
    assert all((pipe[k] == v).all()
               for k, v in load_file(str(out / "retriever/passage/model.safetensors")).items())
    joint_q = load_file(str(out / "retriever/query/model.safetensors"))
    assert any((pipe[k] != v).any() for k, v in joint_q.items())  # the query encoder trained
    joint_g = load_file(str(out / "generator/model.safetensors"))
    run = RecordingRun()  # what the stage's MLflow run gets
    tracked.log_train_rag(run, load_config(Path("params.yaml")), Paths(), m)
    assert run.metrics["test/joint/f1"] == m["test/joint/f1"] and "joint.json" in run.dicts
    assert run.artifacts == [("train_rag.json", None), ("train_rag_loss.png", "plots")]

    cfg, paths = load_config(Path("params.yaml")), Paths()

    with pytest.raises(Crash):
        run_train_rag(cfg, paths, resume=False, progress=False, on_step=crash_at(3))
    state = json.loads((p / "checkpoints/rag_joint/last/trainer_state.json").read_text())
    assert state["state"]["step"] == 2  # the last checkpoint before the crash
    m2 = run_train_rag(cfg, paths, resume=True, progress=False)
    assert m2["train/steps"] == 4
    for f, want in (("retriever/query/model.safetensors", joint_q),
                    ("generator/model.safetensors", joint_g)):
        got = load_file(str(out / f))
        assert got.keys() == want.keys()
        assert all((got[k] == want[k]).all() for k in want), f


def test_index_refresh_logs_staleness_and_resumes_to_the_same_weights(
        tiny_rag_project: Path) -> None:
    """Stretch: the passage tower trains too (RAG-Token here), the corpus re-encoded every 2
    steps (each passage's windows); a crash after the refresh resumes with the refreshed
    embeddings it had."""
    _windows(tiny_rag_project, 6)
    cfg = load_config(Path("params.yaml"), {
        "joint": {"enabled": True, "top_k": 2, "batch_size": 2, "max_steps": 4,
                  "checkpoint_every": 1, "precision": "fp32", "dev_questions": 0,
                  "eval_batch_size": 4, "marginal": "token", "train_passages": True,
                  "refresh_every": 2, "eval_at_start": False}})
    paths = Paths()
    logs: list[tuple[int, dict]] = []
    m = run_train_rag(cfg, paths, resume=False, progress=False,
                      on_step=lambda s, x: logs.append((s, dict(x))))
    refreshes = [(s, x) for s, x in logs if "refresh/seconds" in x]
    assert [s for s, _ in refreshes] == [2] and m["refresh/count"] == 1
    assert {"refresh/stale_recall_at_2", "refresh/fresh_recall_at_2"} <= set(refreshes[0][1])
    # the refreshed embeddings, fused with BM25, as the RAG model retrieves (`hybrid`)
    assert "test/joint_hybrid/em" in m and "dev/joint_hybrid/recall_at_1" in m
    out = tiny_rag_project / "artifacts/rag_joint"
    pipe = load_file(str(tiny_rag_project / "artifacts/retriever/query/model.safetensors"))
    passage = load_file(str(out / "retriever/passage/model.safetensors"))
    assert any((pipe[k] != v).any() for k, v in passage.items())  # the passage tower trained
    meta = json.loads((out / "embeddings/meta.json").read_text())
    assert meta["encoder_fingerprint"] == json.loads(
        (out / "retriever/retriever.json").read_text())["fingerprint"]
    want = {f: load_file(str(out / f)) for f in ("retriever/query/model.safetensors",
                                                 "retriever/passage/model.safetensors",
                                                 "generator/model.safetensors")}

    with pytest.raises(Crash):
        run_train_rag(cfg, paths, resume=False, progress=False, on_step=crash_at(3))
    run_train_rag(cfg, paths, resume=True, progress=False)
    for f, w in want.items():
        got = load_file(str(out / f))
        assert all((got[k] == w[k]).all() for k in w), f


def test_the_pipeline_pair_is_a_dev_candidate(tiny_rag_project: Path) -> None:
    """joint.eval_at_start (the default): the pipeline-trained pair is evaluated on dev before
    the first step and is what the stage saves when no trained step beats its dev F1."""
    logs: list[tuple[int, dict]] = []
    cfg = load_config(Path("params.yaml"), {"joint": {
        "enabled": True, "top_k": 2, "batch_size": 2, "max_steps": 2, "eval_every": 1,
        "precision": "fp32", "dev_questions": 0, "eval_batch_size": 4}})
    m = run_train_rag(cfg, Paths(), resume=False, progress=False,
                      on_step=lambda s, x: logs.append((s, dict(x))))
    dev = [(s, x["dev/f1"]) for s, x in logs if "dev/f1" in x]
    assert [s for s, _ in dev] == [0, 1, 2]
    best = max(dev, key=lambda d: d[1])  # the first of equals
    assert m["dev/best_step"] == best[0] and m["dev/f1"] == pytest.approx(best[1])
    assert m["dev/start/f1"] == pytest.approx(dev[0][1])  # the pipeline pair's, in the metrics
    pipe = load_file(str(tiny_rag_project / "artifacts/retriever/query/model.safetensors"))
    saved = load_file(str(tiny_rag_project / "artifacts/rag_joint/retriever/query/"
                          "model.safetensors"))
    assert all((pipe[k] == v).all() for k, v in saved.items()) is (best[0] == 0)


def test_disabled_stage_writes_its_marker_only(tmp_path: Path) -> None:
    m = run_train_rag(Config(), Paths(tmp_path))  # no data at all: none is read
    files = sorted(str(x.relative_to(tmp_path)) for x in tmp_path.rglob("*") if x.is_file())
    assert files == ["artifacts/rag_joint/DISABLED.json", "metrics/train_rag.json",
                     "plots/train_rag.json"]
    assert json.loads((tmp_path / files[0]).read_text())["enabled"] is False
    assert m == {"joint/enabled": 0, "train/steps": 0}
    assert json.loads((tmp_path / files[2]).read_text()) == []
    run = RecordingRun()
    tracked.log_train_rag(run, Config(), Paths(tmp_path), m)
    assert run.metrics == {"joint/enabled": 0.0, "train/steps": 0.0}
    assert run.dicts["rag_joint_disabled.json"]["enabled"] is False and not run.artifacts


def test_refresh_needs_a_trainable_passage_tower() -> None:
    from ragtrain.config import config_from_dict
    from ragtrain.errors import ConfigError

    with pytest.raises(ConfigError, match="refresh_every: the index only changes"):
        config_from_dict({"joint": {"refresh_every": 10}})
    assert config_from_dict({"joint": {"refresh_every": 10, "train_passages": True}})
