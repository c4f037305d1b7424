"""Data without reference answers (BEIR): the generator stages are skipped the DVC way and the
retriever is packaged, registered and served on its own; mixed data trains the generator on the
questions that have answers. Fast: a tiny BERT, 10 passages, stages run in-process."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from ragtrain import cli
from ragtrain.errors import DataError
from tests.conftest import FIXTURES, TINY_RETRIEVER_PARAMS, run_stages

TOPICS = [("Cats", "Cats purr when they are content and sleep a lot.", "why do cats purr"),
          ("Dogs", "Dogs bark at strangers near the house.", "why do dogs bark"),
          ("Birds", "Birds migrate south in winter to find food.", "where do birds go in winter"),
          ("Fish", "Fish breathe through gills under water.", "how do fish breathe"),
          ("Bees", "Bees make honey from flower nectar.", "what do bees make"),
          ("Owls", "Owls hunt mice at night with silent wings.", "when do owls hunt"),
          ("Frogs", "Frogs lay eggs in ponds every spring.", "where do frogs lay eggs"),
          ("Ants", "Ants carry leaves back to the colony.", "what do ants carry"),
          ("Bats", "Bats use echoes to find insects in the dark.", "how do bats find insects"),
          ("Cows", "Cows chew grass for many hours each day.", "what do cows chew")]

# what a BEIR project adds to the tiny retriever params (nDCG@3: rank_cutoff 3)
BEIR_PARAMS = TINY_RETRIEVER_PARAMS + """evaluation:
  recall_ks: [1, 2, 5]
  rank_cutoff: 3
tracking:
  enabled: {tracked}
  uri: sqlite:///mlruns/mlflow.db
registry:
  retrieval_metric: test/ndcg_at_3
"""

STAGES = ("fetch", "prepare", "build-bm25", "train-retriever", "train-reranker", "build-index",
          "eval-retriever", "retrieve", "train-generator", "evaluate", "package")


def make_beir(root: Path) -> Path:
    """A tiny BEIR folder: corpus.jsonl (_id, title, text), queries.jsonl, qrels/test.tsv."""
    (root / "qrels").mkdir(parents=True)
    with open(root / "corpus.jsonl", "w") as c, open(root / "queries.jsonl", "w") as q:
        for i, (title, text, query) in enumerate(TOPICS):
            c.write(json.dumps({"_id": f"d{i}", "title": title, "text": text}) + "\n")
            q.write(json.dumps({"_id": f"q{i}", "text": query}) + "\n")
    (root / "qrels/test.tsv").write_text("query-id\tcorpus-id\tscore\n" + "".join(
        f"q{i}\td{i}\t1\n" for i in range(len(TOPICS))))
    return root


@pytest.fixture(scope="module")
def beir_project(tmp_path_factory: pytest.TempPathFactory, tiny_bert_dir: Path) -> Path:
    """A tiny BEIR project with every stage up to `package` run (no tracking)."""

    root = tmp_path_factory.mktemp("beir_proj")
    src = make_beir(root / "beir")
    (root / "params.yaml").write_text(BEIR_PARAMS.format(source=src, bert=tiny_bert_dir,
                                                         tracked="false"))
    run_stages(root, STAGES)
    return root


# --------------------------------------------------------------------------- pieces


def test_answered_keeps_the_questions_with_answers() -> None:
    from ragtrain.data.questions import answered, has_answer

    rows = [{"answers": ["a"]}, {"answers": []}, {}, {"answers": [" "]}, {"answers": ["b"]}]
    assert [has_answer(r) for r in rows] == [True, False, False, False, True]
    kept, left_out = answered(rows)
    assert kept == [rows[0], rows[4]] and left_out == 3


def _plan_paths(tmp_path: Path, train: list[list[str]], test: list[list[str]]):
    from ragtrain.pipeline.paths import Paths

    paths = Paths(tmp_path)
    paths.prepared.mkdir(parents=True)
    for split, answers in (("train", train), ("dev", []), ("test", test)):
        paths.queries(split).write_text("".join(
            json.dumps({"id": f"{split}{i}", "question": "q?", "answers": a}) + "\n"
            for i, a in enumerate(answers)))
    return paths


@pytest.mark.parametrize(("enabled", "train", "test", "expect"), [
    ("auto", [["x"], []], [["y"]], True),  # mixed: trained on those with answers
    ("auto", [[], []], [[]], False),  # BEIR: skipped
    ("auto", [["x"]], [[]], False),  # nothing to score it on: skipped
    (False, [["x"]], [["y"]], False),  # asked for retrieval only
    (True, [[], []], [[]], "error"),
])
def test_generator_plan(tmp_path: Path, enabled, train, test, expect) -> None:
    from ragtrain.config import load_config
    from ragtrain.pipeline.generation import generator_plan

    (tmp_path / "params.yaml").write_text("")
    cfg = load_config(tmp_path / "params.yaml", {"generator.enabled": enabled})
    paths = _plan_paths(tmp_path, train, test)
    if expect == "error":
        with pytest.raises(DataError, match=r"train.jsonl and .*test.jsonl: no question has a "
                                            "reference answer.*generator.enabled is true"):
            generator_plan(cfg, paths)
        return
    ok, why = generator_plan(cfg, paths)
    assert ok is expect and (why == "") is expect
    if enabled is False:
        assert why == "generator.enabled is false in params.yaml"


def test_generator_enabled_is_checked(tmp_path: Path) -> None:
    from ragtrain.config import load_config
    from ragtrain.errors import ConfigError

    (tmp_path / "params.yaml").write_text("generator:\n  enabled: maybe\n")
    with pytest.raises(ConfigError, match=r"params.generator.enabled: expected one of 'auto', "
                                          "True, False, got 'maybe'"):
        load_config(tmp_path / "params.yaml")


def test_own_jsonl_question_without_answers_needs_gold_ids(tmp_path: Path) -> None:
    from ragtrain.config import DataConfig
    from ragtrain.data.formats import read_dataset
    from ragtrain.data.prepare import prepare_dataset

    d = tmp_path / "data"
    d.mkdir()
    (d / "corpus.jsonl").write_text((FIXTURES / "tiny_jsonl/corpus.jsonl").read_text())
    qa = (FIXTURES / "tiny_jsonl/qa.jsonl").read_text()
    (d / "qa.jsonl").write_text(qa + json.dumps(
        {"id": "r1", "question": "Which city is on the Tiber?", "gold_passage_ids": ["d3"]})
        + "\n")
    ds = read_dataset(d)
    r1 = next(q for q in ds.questions if q.qid == "r1")
    assert r1.answers == []
    stats = prepare_dataset(ds, DataConfig(test_fraction=0.2, dev_fraction=0.2)).stats
    assert stats["data/questions_without_answers"] == 1
    assert sum(stats[f"{s}/questions_without_answers"] for s in ("train", "dev", "test")) == 1
    # without gold ids an answer is still required (it is how the gold is found)
    (d / "qa.jsonl").write_text(qa + '{"id": "r2", "question": "Which city?"}\n')
    with pytest.raises(DataError, match=r"qa.jsonl:\d+: missing field 'answers'"):
        read_dataset(d)


def test_squad_like_data_gets_no_new_metric_keys() -> None:
    from ragtrain.config import DataConfig
    from ragtrain.data.formats import read_dataset
    from ragtrain.data.prepare import prepare_dataset

    stats = prepare_dataset(read_dataset(FIXTURES / "tiny_jsonl"), DataConfig()).stats
    assert not any("without_answers" in k for k in stats)  # metrics/prepare.json unchanged


def test_read_questions_takes_beir_queries(tmp_path: Path) -> None:
    from ragtrain.data.questions import read_questions

    f = tmp_path / "queries.jsonl"
    f.write_text('{"_id": "q7", "text": "why do cats purr"}\n{"question": "x?"}\n')
    assert read_questions(f) == [{"id": "q7", "question": "why do cats purr"},
                                 {"id": "2", "question": "x?"}]
    f.write_text('{"_id": "q7", "text": ""}\n')
    with pytest.raises(DataError, match=r"queries.jsonl:1: needs a non-empty string \"text\""):
        read_questions(f)


def test_trec_run_format() -> None:
    ranked = [{"id": "q1", "passage_ids": ["d2", "d1"], "scores": [0.9, 0.25]},
              {"id": "q2", "passage_ids": [], "scores": []}]
    assert cli.trec_run(ranked, "mine") == ("q1 Q0 d2 1 0.900000 mine\n"
                                            "q1 Q0 d1 2 0.250000 mine\n")


def test_retriever_pyfunc_output_and_signature() -> None:
    from ragtrain.tracking.pyfunc import _plain, signature

    out = _plain({"question": "q", "passages": [{"id": 1, "title": "t", "text": "x",
                                                 "score": 0.5}]})
    assert out == {"question": "q", "passages": [{"id": "1", "title": "t", "text": "x",
                                                  "score": 0.5}]}
    assert signature("retriever").outputs.input_names() == ["question", "passages"]
    assert "answer" in signature("rag").outputs.input_names()


def _tags(kind: str = "rag", **extra: str) -> dict[str, str]:
    from ragtrain.tracking import registry as r

    return {r.ENCODER_FP_TAG: "e" * 64, r.INDEX_FP_TAG: "e" * 64, r.EVAL_SET_TAG: "s" * 64,
            r.KIND_TAG: kind, **extra}


def test_registry_never_compares_a_retriever_with_a_rag_model() -> None:
    from ragtrain.config import RegistryConfig
    from ragtrain.tracking.registry import check_compatible, judged_on

    d = check_compatible("2", _tags("retriever"), "1", _tags("rag"))
    assert d is not None and not d.promote
    assert "challenger 2 is a retriever model, champion 1 a rag model" in d.reason
    assert check_compatible("2", _tags("retriever"), "1", _tags("retriever")) is None
    rc = RegistryConfig(retrieval_metric="test/recall_at_5", retrieval_floor=0.3)
    assert judged_on(rc, "retriever") == ("test/recall_at_5", 0.3)
    assert judged_on(rc, "rag") == ("test/f1", 10.0)


def test_registry_refuses_a_mismatched_reranker() -> None:
    from ragtrain.tracking import registry as r

    ok = _tags(**{r.RERANKER_FP_TAG: "a" * 64, r.RERANKER_WEIGHTS_TAG: "a" * 64})
    assert r.check_compatible("1", ok, None, None) is None
    bad = _tags(**{r.RERANKER_FP_TAG: "a" * 64, r.RERANKER_WEIGHTS_TAG: "b" * 64})
    d = r.check_compatible("1", bad, None, None)
    assert d is not None and not d.promote
    assert "binds reranker aaaaaaaaaaaaaaaa, but the reranker it holds is bbbbbbbbbbbbbbbb" in (
        d.reason)


# --------------------------------------------------------------------------- a BEIR project


def test_beir_project_skips_the_generator_with_markers(beir_project: Path) -> None:
    p = beir_project
    marker = json.loads((p / "artifacts/generator/DISABLED.json").read_text())
    assert marker["enabled"] is False
    assert "has a reference answer (retrieval-only" in marker["reason"]
    assert sorted(x.name for x in (p / "artifacts/generator").iterdir()) == ["DISABLED.json"]
    assert json.loads((p / "metrics/train_generator.json").read_text()) == {
        "generator/enabled": 0, "train/steps": 0}
    assert json.loads((p / "plots/train_generator.json").read_text()) == []
    assert json.loads((p / "metrics/generator.json").read_text()) == {"generator/enabled": 0}
    assert (p / "artifacts/eval/generator_test.jsonl").read_text() == ""
    stats = json.loads((p / "metrics/prepare.json").read_text())
    assert stats["data/questions_without_answers"] == len(TOPICS)
    m = json.loads((p / "metrics/retriever.json").read_text())
    assert 0 <= m["test/ndcg_at_3"] <= 1  # what promotion reads in the BEIR case
    manifest = json.loads((p / "artifacts/rag/rag.json").read_text())
    assert manifest["kind"] == "retriever" and manifest["generator"] is None
    assert not (p / "artifacts/rag/generator").exists()


def test_beir_ask_prints_passages_without_an_answer_line(
        beir_project: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture) -> None:
    monkeypatch.chdir(beir_project)
    assert cli.main(["ask", "--top-k", "3", "why do cats purr"]) == 0
    out = capsys.readouterr().out
    assert "answer" not in out and out.startswith("[1] d")
    assert out.count("(score ") == 3
    assert cli.main(["ask", "--json", "--bundle", "artifacts/rag", "why do cats purr"]) == 0
    a = json.loads(capsys.readouterr().out)
    assert set(a) == {"question", "passages"} and len(a["passages"]) == 2
    assert a["passages"][0]["score"] >= a["passages"][1]["score"]


def test_beir_predict_writes_ranked_ids_and_a_trec_run(
        beir_project: Path, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.chdir(beir_project)
    out, trec = tmp_path / "ranked.jsonl", tmp_path / "run.trec"
    assert cli.main(["predict", "beir/queries.jsonl", "-o", str(out), "--trec", str(trec),
                     "--top-k", "3"]) == 0
    rows = [json.loads(x) for x in out.read_text().splitlines()]
    assert [r["id"] for r in rows] == [f"q{i}" for i in range(len(TOPICS))]
    assert all(set(r) == {"id", "question", "passage_ids", "scores"} for r in rows)
    assert all(len(r["passage_ids"]) == 3 and r["scores"] == sorted(r["scores"], reverse=True)
               for r in rows)
    lines = trec.read_text().splitlines()
    assert len(lines) == 3 * len(TOPICS)
    q, q0, pid, rank, score, tag = lines[0].split()
    assert (q, q0, pid, rank, tag) == ("q0", "Q0", rows[0]["passage_ids"][0], "1", "ragtrain")
    assert cli.main(["predict", "beir/queries.jsonl", "-o", str(out), "--trec", str(trec),
                     "--trec-tag", "a b"]) == 2  # a tag with a space would break the format


def test_generator_enabled_true_on_beir_fails_naming_the_files(
        beir_project: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture) -> None:
    import shutil

    proj = tmp_path / "p"
    shutil.copytree(beir_project, proj)
    monkeypatch.chdir(proj)
    before = (proj / "artifacts/generator/DISABLED.json").read_text()
    assert cli.main(["-p", "params.yaml", "train-generator"]) == 0  # auto: skipped again
    with open(proj / "params.yaml", "a") as f:
        f.write("generator:\n  enabled: true\n")
    assert cli.main(["train-generator"]) == 2
    err = capsys.readouterr().err
    assert "data/prepared/train.jsonl and data/prepared/test.jsonl: no question has a " \
           "reference answer" in err
    assert (proj / "artifacts/generator/DISABLED.json").read_text() == before  # untouched


# --------------------------------------------------------------------------- mixed data


def test_mixed_data_trains_the_generator_on_the_answered_questions(
        tmp_path: Path, tiny_bert_dir: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture) -> None:
    from tests.conftest import TINY_RAG_PARAMS

    data = tmp_path / "data_src"
    data.mkdir()
    corpus = [{"id": f"d{i}", "title": t, "text": text} for i, (t, text, _) in enumerate(TOPICS)]
    (data / "corpus.jsonl").write_text("".join(json.dumps(c) + "\n" for c in corpus))
    qa = []
    for i, (_, text, query) in enumerate(TOPICS):
        row = {"id": f"q{i}", "question": query, "gold_passage_ids": [f"d{i}"]}
        if i % 3:  # two questions in three have an answer (their passage's last word)
            row["answers"] = [text.rstrip(".").split()[-1]]
        qa.append(row)
    (data / "qa.jsonl").write_text("".join(json.dumps(r) + "\n" for r in qa))
    (tmp_path / "params.yaml").write_text(TINY_RAG_PARAMS.format(
        source=data, bert=tiny_bert_dir, tracked="false", uri="sqlite:///mlruns/mlflow.db")
)
    monkeypatch.chdir(tmp_path)
    for stage in ("fetch", "prepare", "build-bm25", "train-retriever", "build-index",
                  "retrieve", "train-generator", "evaluate"):
        assert cli.main([stage]) == 0, stage
    err = capsys.readouterr().err
    rows = {s: [json.loads(x) for x in open(f"data/prepared/{s}.jsonl")]
            for s in ("train", "dev", "test")}
    n_out = {s: sum(not r["answers"] for r in rows[s]) for s in rows}
    m = json.loads(open("metrics/train_generator.json").read())
    assert m["train/steps"] == 3 and not Path("artifacts/generator/DISABLED.json").exists()
    assert n_out["train"] > 0  # this split leaves some out of training
    assert m["train/questions_without_answers"] == n_out["train"]
    assert m["dev/questions_without_answers"] == n_out["dev"]
    assert (f"train_generator: {n_out['train']} of {len(rows['train'])} train questions in "
            "data/prepared/train.jsonl have no reference answer: left out") in err
    g = json.loads(open("metrics/generator.json").read())
    assert g["test/n_questions"] == len(rows["test"]) - n_out["test"]
    assert g.get("test/questions_without_answers", 0) == n_out["test"]
    scored = [json.loads(x) for x in open("artifacts/eval/generator_test.jsonl")]
    assert all(r["references"] for r in scored)


# --------------------------------------------------------------------------- the registry


def test_registry_promotes_a_retriever_model_on_the_retrieval_metric(tmp_path: Path) -> None:
    """Against a real MLflow sqlite store (stand-in bundles: nothing loads them)."""
    from ragtrain import tracking
    from ragtrain.config import RegistryConfig, TrackingConfig
    from ragtrain.errors import RegistryError
    from ragtrain.tracking import registry

    tcfg = TrackingConfig(uri=f"sqlite:///{tmp_path}/mlruns/mlflow.db", experiment="t")
    rcfg = RegistryConfig(model_name="beir", retrieval_metric="test/ndcg_at_10",
                          retrieval_floor=0.5)

    def reg(kind: str, metrics: dict[str, float]) -> registry.Registered:
        d = tmp_path / f"b{len(list(tmp_path.iterdir()))}"
        for sub in ("rag", "encoder"):
            (d / sub).mkdir(parents=True)
        manifest = {"kind": kind, "eval_set_sha256": "s" * 64, "encoder_fingerprint": "e",
                    "index_encoder_fingerprint": "e", "corpus_sha256": "c"}
        (d / "rag/rag.json").write_text(json.dumps(manifest))
        with tracking.run(tcfg, "register", root=tmp_path) as run:
            return registry.register(run, rcfg, tcfg, bundle=d / "rag", manifest=manifest,
                                     metrics=metrics, components={"retriever": [d / "encoder"]},
                                     example_questions=["q?"], root=tmp_path)

    with pytest.raises(RegistryError, match=r"registry.retrieval_metric: 'test/ndcg_at_10' is "
                                            "not among the metrics"):
        reg("retriever", {"test/recall_at_5": 0.9})
    r = reg("retriever", {"test/ndcg_at_10": 0.4})
    assert r.components == {"retriever": "1"}
    p = registry.promote(rcfg, tcfg, root=tmp_path)
    assert not p.promoted and "does not meet the floor 0.5" in p.decision.reason
    reg("retriever", {"test/ndcg_at_10": 0.7})
    p = registry.promote(rcfg, tcfg, root=tmp_path)
    assert p.promoted and p.metric == "test/ndcg_at_10", p.decision.reason
    # a RAG model (judged on test/f1) is never compared with a retriever champion
    reg("rag", {"test/f1": 80.0, "test/ndcg_at_10": 0.9})
    p = registry.promote(rcfg, tcfg, root=tmp_path)
    assert not p.promoted and "is a rag model, champion 2 a retriever model" in p.decision.reason
    q = tmp_path / "qa.jsonl"
    q.write_text('{"question": "q?", "answers": ["a"]}\n')
    with pytest.raises(RegistryError, match="is a retriever model .*no answers to score"):
        from ragtrain.tracking.rescore import evaluate_version

        evaluate_version(rcfg, tcfg, q, root=tmp_path)
