"""With reranker.enabled, what the RAG model uses is reranked retrieval: the bundle binds the
reranker's fingerprint, and `ask`, the bundle and the pyfunc that `mlflow models serve` loads all
rerank the first stage's candidates. A tiny project (5 passages) and a tiny random reranker whose
order differs from the first stage's."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from ragtrain import cli
from ragtrain.errors import IndexMismatchError, RagtrainError

RERANK = "reranker:\n  enabled: true\n  candidates: 5\n  fuse_weight: 1.0\n  precision: fp32\n"


@pytest.fixture()
def reranking_project(tiny_rag_project: Path, tiny_bert_dir: Path) -> Path:
    """The tiny RAG project with a (random, tiny) reranker saved and reranker.enabled on, the
    bundle packaged again with it."""
    from ragtrain.retrieval.reranker import Reranker, RerankerSpec

    p = tiny_rag_project
    Reranker.from_pretrained(RerankerSpec(str(tiny_bert_dir), 64), seed=3).save(
        p / "artifacts/reranker")
    with open(p / "params.yaml", "a") as f:
        f.write(RERANK)
    assert cli.main(["package"]) == 0
    return p


def _questions(p: Path) -> list[str]:
    return [json.loads(x)["question"] for s in ("train", "dev", "test")
            for x in (p / f"data/prepared/{s}.jsonl").open() if x.strip()]


def test_bundle_ask_and_pyfunc_rerank(reranking_project: Path, tmp_path: Path,
                                      capsys: pytest.CaptureFixture) -> None:
    import mlflow.pyfunc
    import pandas as pd

    from ragtrain.generation.bundle import reranker_fingerprint
    from ragtrain.generation.rag import RAGModel
    from ragtrain.retrieval.reranker import passage_texts
    from ragtrain.tracking.pyfunc import save_rag_pyfunc

    p = reranking_project
    manifest = json.loads((p / "artifacts/rag/rag.json").read_text())
    assert manifest["reranker"]["fingerprint"] == reranker_fingerprint(p / "artifacts/reranker")
    assert manifest["reranker"]["candidates"] == 5 and manifest["reranker"]["fuse_weight"] == 1
    assert manifest["reranker"]["max_windows"] == 2  # the config's default, recorded
    m = RAGModel.load(p / "artifacts/rag")
    assert m.reranker is not None
    n = m.retriever.n_passages
    questions = _questions(p)
    first = m.first_stage(questions, n)
    reranked = m.retrieve(questions, n)
    # fuse_weight 1.0: the order is the reranker's own scores over the first stage's list
    texts = passage_texts(m.corpus, m.reranker.spec)
    scores = m.reranker.score(questions, [[texts[pid] for pid, _ in f] for f in first])
    for f, r, s in zip(first, reranked, scores, strict=True):
        expect = [f[j][0] for j in sorted(range(len(f)), key=lambda j: (-s[j], j))]
        assert [pid for pid, _ in r] == expect
    differs = [q for q, f, r in zip(questions, first, reranked, strict=True)
               if [x for x, _ in f] != [x for x, _ in r]]
    assert differs, "the crafted case must reorder at least one question's list"
    q = differs[0]
    want = [pid for pid, _ in m.retrieve([q], n)[0]]
    assert want != [pid for pid, _ in m.first_stage([q], n)[0]]

    # a bundle packaged before reranker.max_windows read every window of a passage
    old = {**manifest, "reranker": {k: v for k, v in manifest["reranker"].items()
                                    if k != "max_windows"}}
    (p / "artifacts/rag/rag.json").write_text(json.dumps(old))
    assert RAGModel.load(p / "artifacts/rag").rerank.max_windows == 0
    (p / "artifacts/rag/rag.json").write_text(json.dumps(manifest))

    # `ragtrain ask` from the current outputs and from the bundle
    for extra in ([], ["--bundle", "artifacts/rag"]):
        assert cli.main(["ask", "--json", "--top-k", str(n), *extra, q]) == 0
        a = json.loads(capsys.readouterr().out)
        assert [x["id"] for x in a["passages"]] == want and a["answer"] is not None

    # the pyfunc model `mlflow models serve` loads (the registered composite model)
    model_dir = save_rag_pyfunc(p / "artifacts/rag", tmp_path / "model", [q])
    served = mlflow.pyfunc.load_model(str(model_dir)).predict(
        pd.DataFrame({"question": [q]}), params={"top_k": n})
    assert [x["id"] for x in served[0]["passages"]] == want


def test_reranker_fingerprint_mismatch_is_refused(reranking_project: Path,
                                                  tmp_path: Path) -> None:
    import shutil

    from ragtrain.generation.rag import RAGModel
    from ragtrain.tracking import registry
    from tests.conftest import tamper_safetensors

    p = reranking_project
    bundle = tmp_path / "rag"
    shutil.copytree(p / "artifacts/rag", bundle)
    f = bundle / "rag.json"
    manifest = json.loads(f.read_text())
    good_fp = manifest["reranker"]["fingerprint"]
    # registered as packaged: both fingerprints agree, the registry accepts it
    tags = {**registry.binding_tags(manifest, bundle), registry.EVAL_SET_TAG: "s" * 64}
    assert tags[registry.RERANKER_FP_TAG] == tags[registry.RERANKER_WEIGHTS_TAG] == good_fp
    assert registry.check_compatible("1", tags, None, None) is None

    # the manifest binds another reranker than the one the bundle holds
    manifest["reranker"]["fingerprint"] = "0" * 64
    f.write_text(json.dumps(manifest))
    with pytest.raises(IndexMismatchError, match="binds reranker 0000000000000000, but .* holds "
                                                 f"reranker {good_fp[:16]}"):
        RAGModel.load(bundle)
    d = registry.check_compatible("1", {**registry.binding_tags(manifest, bundle),
                                        registry.EVAL_SET_TAG: "s" * 64}, None, None)
    assert d is not None and not d.promote and "binds reranker 0000000000000000" in d.reason

    # the reranker's weights edited on disk (its own record no longer matches)
    manifest["reranker"]["fingerprint"] = good_fp
    f.write_text(json.dumps(manifest))
    tamper_safetensors(next((bundle / "reranker").rglob("*.safetensors")))
    with pytest.raises(RagtrainError, match="weights do not match the fingerprint"):
        RAGModel.load(bundle)


def test_reranker_enabled_without_a_trained_one_is_a_clear_error(
        tiny_rag_project: Path, capsys: pytest.CaptureFixture) -> None:
    p = tiny_rag_project
    assert cli.main(["train-reranker"]) == 0  # disabled: the marker
    with open(p / "params.yaml", "a") as f:
        f.write(RERANK)
    before = (p / "artifacts/rag/rag.json").read_text()
    assert cli.main(["package"]) == 2
    assert "artifacts/reranker/DISABLED.json: reranker.enabled is true but no reranker was " \
           "trained" in capsys.readouterr().err
    assert (p / "artifacts/rag/rag.json").read_text() == before  # no half-written bundle
    assert json.loads(before)["reranker"] is None


def test_index_search_settings_reach_the_bundle(tiny_rag_project: Path) -> None:
    """index.mmap in params: `package` records it in the bundle's manifest and the loaded
    bundle searches its index from the mapped file; the default leaves the manifest as it was."""
    from ragtrain.generation.rag import RAGModel

    p = tiny_rag_project
    assert "index" not in json.loads((p / "artifacts/rag/rag.json").read_text())
    with open(p / "params.yaml", "a") as f:
        f.write("index:\n  mmap: true\n")
    assert cli.main(["package"]) == 0
    assert json.loads((p / "artifacts/rag/rag.json").read_text())["index"] == {"mmap": True}
    m = RAGModel.load(p / "artifacts/rag")
    maps = Path("/proc/self/maps").read_text()
    assert str((p / "artifacts/rag/index/index.faiss").resolve()) in maps
    assert m.answer(_questions(p)[:2])


def test_evaluate_answers_from_both_the_reranked_and_the_first_stage_lists(
        reranking_project: Path) -> None:
    """With a reranker, `retrieve` keeps the first stage's list beside the reranked one and
    `evaluate` reports the same generator's answers on both: test/first_stage/* are the
    metrics of evaluating without the reranker (the fixture's own evaluate, run before)."""
    p = reranking_project
    before = json.loads((p / "metrics/generator.json").read_text())
    assert "test/first_stage/em" not in before
    first = {json.loads(x)["id"]: json.loads(x)["passage_ids"]
             for x in (p / "artifacts/retrieved/test.jsonl").open() if x.strip()}
    assert cli.main(["retrieve"]) == 0
    rows = [json.loads(x) for x in (p / "artifacts/retrieved/test.jsonl").open() if x.strip()]
    assert rows and all(r["first_stage_ids"] == first[r["id"]] for r in rows)
    assert all(len(r["first_stage_scores"]) == len(r["first_stage_ids"]) for r in rows)
    assert any(r["passage_ids"] != r["first_stage_ids"] for r in rows), "nothing reranked"
    assert cli.main(["evaluate"]) == 0
    after = json.loads((p / "metrics/generator.json").read_text())
    for m in ("em", "f1", "accuracy"):
        assert after[f"test/first_stage/{m}"] == before[f"test/{m}"], m
