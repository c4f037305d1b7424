from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

from ragtrain.errors import IndexFileError, IndexMismatchError, RetrievalError
from ragtrain.retrieval.bm25 import BM25Retriever, sha256_corpus

TEXTS = [
    "The Eiffel Tower is in Paris.",
    "Paris is the capital of France.",
    "Berlin is the capital of Germany.",
    "The Colosseum is in Rome.",
]
IDS = ["eiffel", "paris", "berlin", "rome"]


@pytest.fixture
def retriever() -> BM25Retriever:
    return BM25Retriever.build(TEXTS, IDS)


def test_search_ranks_by_term_overlap(retriever: BM25Retriever) -> None:
    scores, ids = retriever.search(["capital of Germany", "EIFFEL tower"], k=2)
    assert scores.shape == (2, 2)
    assert ids[0] == ["berlin", "paris"]  # "germany" is rarer than "capital"
    assert ids[1][0] == "eiffel"  # lowercased
    assert scores[0, 0] > scores[0, 1] > 0
    assert scores[1, 1] == 0.0


def test_score_matches_lucene_bm25_by_hand(retriever: BM25Retriever) -> None:
    # "germany" occurs once, in berlin (3 tokens after stopwords: berlin capital germany).
    # Lucene idf = ln(1 + (N - df + 0.5) / (df + 0.5)) = ln(1 + 3.5 / 1.5)
    # avg doc length: eiffel tower paris | paris capital france | berlin capital germany |
    # colosseum rome = (3 + 3 + 3 + 2) / 4 = 2.75
    idf = math.log(1 + 3.5 / 1.5)
    tf_part = 1 / (1 + 1.5 * (1 - 0.75 + 0.75 * 3 / 2.75))
    scores, _ = retriever.search(["germany"], k=1)
    assert scores[0, 0] == pytest.approx(idf * tf_part, rel=1e-5)


def test_ties_are_broken_by_id_and_unknown_words_score_zero() -> None:
    r = BM25Retriever.build(["same words", "same words", "other"], ["c", "a", "b"])
    scores, ids = r.search(["same", "zzz unknown"], k=3)
    assert ids[0] == ["a", "c", "b"]
    assert ids[1] == ["a", "b", "c"]  # all zero: id order
    np.testing.assert_array_equal(scores[1], 0.0)


def test_deterministic(retriever: BM25Retriever) -> None:
    a = retriever.search(["paris capital", "rome"], k=4)
    b = BM25Retriever.build(TEXTS, IDS).search(["paris capital", "rome"], k=4)
    np.testing.assert_array_equal(a[0], b[0])
    assert a[1] == b[1]


def test_saved_bytes_do_not_depend_on_the_process_hash_seed(tmp_path: Path) -> None:
    """Two processes with different string hashing save byte-identical files (DVC hashes them:
    a rebuild with the same result must not rerun every stage downstream)."""
    import hashlib
    import os
    import subprocess
    import sys

    code = ("import sys; from pathlib import Path; from ragtrain.retrieval.bm25 import "
            "BM25Retriever; BM25Retriever.build(sys.argv[2:], [f'p{i}' for i in "
            "range(len(sys.argv) - 2)]).save(Path(sys.argv[1]))")
    texts = [*TEXTS, "Alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu nu xi."]
    digests = []
    for seed in ("1", "2"):
        out = tmp_path / f"bm25_{seed}"
        subprocess.run([sys.executable, "-c", code, str(out), *texts], check=True,
                       env={**os.environ, "PYTHONHASHSEED": seed})
        digests.append({str(f.relative_to(out)): hashlib.md5(f.read_bytes()).hexdigest()
                        for f in sorted(out.rglob("*")) if f.is_file()})
    assert len(digests[0]) >= 5 and digests[0] == digests[1]


def test_save_load_round_trip(tmp_path: Path, retriever: BM25Retriever) -> None:
    retriever.save(tmp_path / "bm25")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bm25"]  # no temp leftovers
    meta = json.loads((tmp_path / "bm25" / "meta.json").read_text())
    assert meta["passage_ids"] == IDS
    assert meta["corpus_sha256"] == sha256_corpus(IDS, TEXTS)
    loaded = BM25Retriever.load(tmp_path / "bm25", expect_corpus_sha256=sha256_corpus(IDS, TEXTS))
    queries = ["capital of France", "colosseum"]
    s1, i1 = retriever.search(queries, k=3)
    s2, i2 = loaded.search(queries, k=3)
    assert i1 == i2
    np.testing.assert_array_equal(s1, s2)


def test_load_refuses_other_corpus_and_missing_files(tmp_path: Path,
                                                     retriever: BM25Retriever) -> None:
    retriever.save(tmp_path / "bm25")
    with pytest.raises(IndexMismatchError, match="built from corpus"):
        BM25Retriever.load(tmp_path / "bm25", expect_corpus_sha256="0" * 64)
    with pytest.raises(IndexFileError, match="meta.json: missing"):
        BM25Retriever.load(tmp_path / "nowhere")
    meta_path = tmp_path / "bm25" / "meta.json"
    meta = json.loads(meta_path.read_text())
    meta["passage_ids"] = IDS[:2]
    meta_path.write_text(json.dumps(meta))
    with pytest.raises(IndexFileError, match="do not match"):
        BM25Retriever.load(tmp_path / "bm25")


def test_corpus_hash_depends_on_ids_and_texts() -> None:
    h = sha256_corpus(IDS, TEXTS)
    assert sha256_corpus(IDS[::-1], TEXTS) != h
    assert sha256_corpus(IDS, [*TEXTS[:-1], "changed"]) != h
    assert sha256_corpus(["a", "bc"], ["", ""]) != sha256_corpus(["ab", "c"], ["", ""])
    assert BM25Retriever.build(TEXTS, IDS, corpus_sha256="given").corpus_sha256 == "given"


def test_errors(retriever: BM25Retriever) -> None:
    with pytest.raises(RetrievalError, match="between 1 and 4"):
        retriever.search(["paris"], k=5)
    with pytest.raises(RetrievalError, match="between 1 and 4"):
        retriever.search(["paris"], k=0)
    with pytest.raises(RetrievalError, match="no passages"):
        BM25Retriever.build([], [])
    with pytest.raises(RetrievalError, match="none of the 2 passages"):
        BM25Retriever.build(["the", "a"], ["x", "y"])
    with pytest.raises(RetrievalError, match="1 passage ids for 2 texts"):
        BM25Retriever.build(["a b", "c d"], ["x"])
    with pytest.raises(RetrievalError, match="duplicate passage id 'x'"):
        BM25Retriever.build(["aa bb", "cc dd"], ["x", "x"])
