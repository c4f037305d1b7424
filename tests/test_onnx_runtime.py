"""retriever.runtime: the bi-encoder's inference on ONNX Runtime (fp32 and dynamic int8)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

from ragtrain.config import config_from_dict
from ragtrain.errors import ConfigError, RagtrainError
from ragtrain.retrieval.encoder import BiEncoder, EncoderSpec
from ragtrain.tracking.pyfunc import requirements
from tests.conftest import FIXTURES, TINY_RETRIEVER_PARAMS

pytest.importorskip("onnxruntime", reason="pip install -e .[onnx]")

QUESTIONS = ["who wrote the book?", "when did the war end", "what is the capital of France?"]
PASSAGES = ["Paris is the capital and largest city of France.",
            "The war ended in 1945 after six years of fighting across Europe and Asia.",
            "a short one", "The book was written by an author nobody remembers today."]


def test_onnx_fp32_matches_torch_and_int8_is_close(tiny_bert_dir: Path) -> None:
    m = BiEncoder.from_pretrained(EncoderSpec(str(tiny_bert_dir), shared_encoder=False))
    torch_q, torch_p = m.encode_queries(QUESTIONS, 2), m.encode_passages(PASSAGES, 3)
    m.use_runtime("onnx")
    assert m.onnx is not None and m.onnx[0] is not m.onnx[1]  # each tower its own graph
    q, p = m.encode_queries(QUESTIONS, 2), m.encode_passages(PASSAGES, 3)
    assert np.abs(q - torch_q).max() < 1e-4 and np.abs(p - torch_p).max() < 1e-4
    m.use_runtime("onnx_int8")
    q8, p8 = m.encode_queries(QUESTIONS, 2), m.encode_passages(PASSAGES, 3)
    assert np.abs(p8 - torch_p).max() > 1e-6  # quantized: not the fp32 graph
    assert (q8 * torch_q).sum(1).min() > 0.95 and (p8 * torch_p).sum(1).min() > 0.95
    assert np.allclose(np.linalg.norm(p8, axis=1), 1.0, atol=1e-4)
    m.use_runtime("torch")  # back to the torch towers, bit for bit
    assert m.onnx is None and np.array_equal(m.encode_passages(PASSAGES, 3), torch_p)


def test_shared_encoder_exports_one_graph(tiny_bert_dir: Path) -> None:
    m = BiEncoder.from_pretrained(EncoderSpec(str(tiny_bert_dir))).use_runtime("onnx")
    assert m.onnx is not None and m.onnx[0] is m.onnx[1]


def test_missing_onnxruntime_is_named(tiny_bert_dir: Path,
                                      monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # import fails as if not installed
    m = BiEncoder.from_pretrained(EncoderSpec(str(tiny_bert_dir)))
    with pytest.raises(RagtrainError, match=r"retriever.runtime.*ragtrain\[onnx\]"):
        m.use_runtime("onnx_int8")
    # the reranker's error names its own setting
    from ragtrain.retrieval.reranker import Reranker, RerankerSpec

    r = Reranker.from_pretrained(RerankerSpec(str(tiny_bert_dir), max_length=64))
    with pytest.raises(RagtrainError, match=r"^reranker.runtime: .*set reranker.runtime: torch"):
        r.use_runtime("onnx")
    assert r.onnx is None


def test_runtime_values_are_checked() -> None:
    assert config_from_dict({"retriever": {"runtime": "onnx_int8"}}).retriever.runtime == (
        "onnx_int8")
    with pytest.raises(ConfigError, match="retriever.runtime: expected one of"):
        config_from_dict({"retriever": {"runtime": "tensorrt"}})


def test_served_model_requires_onnxruntime_only_when_it_uses_it() -> None:
    assert not any(r.startswith("onnxruntime==") for r in requirements())
    assert any(r.startswith("onnxruntime==") for r in requirements(onnx=True))


def test_stages_with_onnx_int8(tmp_path: Path, tiny_bert_dir: Path,
                               monkeypatch: pytest.MonkeyPatch,
                               capfd: pytest.CaptureFixture[str]) -> None:
    """build-index encodes the corpus and eval-retriever / retrieve encode the questions through
    ONNX Runtime int8: the embeddings are close to torch's, and the stages run through."""
    from ragtrain import cli

    (tmp_path / "params.yaml").write_text(TINY_RETRIEVER_PARAMS.format(
        source=FIXTURES / "tiny_jsonl", bert=tiny_bert_dir)
        + "tracking:\n  enabled: false\ngenerator:\n  enabled: false\n")
    monkeypatch.chdir(tmp_path)
    for stage in ("fetch", "prepare", "build-bm25", "train-retriever", "build-index"):
        assert cli.main([stage]) == 0, stage
    torch_emb = np.load(tmp_path / "artifacts/embeddings/embeddings.npy")
    params = yaml.safe_load((tmp_path / "params.yaml").read_text())
    params["retriever"]["runtime"] = "onnx_int8"
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    capfd.readouterr()
    for stage in ("build-index", "eval-retriever", "retrieve"):
        assert cli.main([stage]) == 0, stage
        assert "exporting to ONNX (int8)" in capfd.readouterr().err, stage
    emb = np.load(tmp_path / "artifacts/embeddings/embeddings.npy")
    assert emb.shape == torch_emb.shape and not np.array_equal(emb, torch_emb)
    assert (emb * torch_emb).sum(1).min() > 0.95
    metrics = json.loads((tmp_path / "metrics/retriever.json").read_text())
    assert 0.0 <= metrics["test/dense/recall_at_1"] <= 1.0


def test_reranker_on_onnx_scores_as_torch(tiny_bert_dir: Path) -> None:
    from ragtrain.generation.bundle import RERANK_KEYS, Rerank
    from ragtrain.retrieval.reranker import Reranker, RerankerSpec

    r = Reranker.from_pretrained(RerankerSpec(str(tiny_bert_dir), max_length=64))
    lists = [PASSAGES[:3], PASSAGES[1:]]
    base = np.concatenate(r.score(QUESTIONS[:2], lists, batch_size=4))
    r.use_runtime("onnx")
    assert r.onnx is not None and np.abs(np.concatenate(
        r.score(QUESTIONS[:2], lists, batch_size=4)) - base).max() < 1e-4
    r.use_runtime("onnx_int8")
    int8 = np.concatenate(r.score(QUESTIONS[:2], lists, batch_size=4))
    assert not np.array_equal(int8, base) and np.abs(int8 - base).max() < 5e-3
    r.use_runtime("torch")
    assert r.onnx is None and np.array_equal(
        np.concatenate(r.score(QUESTIONS[:2], lists, batch_size=4)), base)
    # a packaged model records reranker.runtime with the other reranking settings
    assert "runtime" in RERANK_KEYS and Rerank().runtime == "torch"
