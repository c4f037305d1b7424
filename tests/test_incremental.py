"""Incremental corpus updates: only changed passages are encoded, and the index equals a full
rebuild's; a cache from another encoding context is never used."""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections.abc import Iterator
from pathlib import Path

import faiss
import numpy as np
import pytest

from ragtrain.config import Config, IndexConfig
from ragtrain.retrieval import embedding_cache as ec
from ragtrain.retrieval import index as ix

CONTEXT = {"encoder_fingerprint": "e" * 64, "pooling": "mean", "tokenizer_sha256": "t" * 64,
           "precision": "fp32"}
KINDS = [IndexConfig(kind="flat", device="cpu"),
         IndexConfig(kind="hnsw", hnsw_m=8, device="cpu"),
         IndexConfig(kind="ivfpq", ivf_nlist=4, ivf_nprobe=4, pq_m=4, pq_bits=6, device="cpu")]


@pytest.fixture(autouse=True)
def one_faiss_thread() -> Iterator[None]:
    n = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(1)
    yield
    faiss.omp_set_num_threads(n)


class CountingEncoder:
    """A deterministic tiny encoder (a unit vector seeded by the text) that counts its inputs."""

    def __init__(self, dim: int = 16) -> None:
        self.dim, self.calls, self.texts = dim, 0, []  # type: ignore[var-annotated]

    def __call__(self, texts: list[str]) -> np.ndarray:
        self.calls += 1
        self.texts += texts
        rows = []
        for t in texts:
            seed = int.from_bytes(hashlib.sha256(t.encode()).digest()[:8], "little")
            v = np.random.default_rng(seed).standard_normal(self.dim).astype(np.float32)
            rows.append(v / np.linalg.norm(v))
        return np.stack(rows)  # (n, dim)


def corpus(n: int) -> dict[str, str]:
    return {f"p{i}": f"passage number {i} about topic {i % 7}" for i in range(n)}


def edited(c: dict[str, str]) -> dict[str, str]:
    """Edit one passage, delete one, add one."""
    out = dict(c)
    out["p3"] = c["p3"] + " (edited)"
    del out["p5"]
    out["p-new"] = "a brand new passage"
    return out


def build(c: dict[str, str], cache: ec.EmbeddingCache | None, enc: CountingEncoder,
          cfg: IndexConfig, out: Path) -> ix.DenseIndex:
    emb, _ = ec.encode_with_cache(list(c.values()), 256, enc, cache)
    idx = ix.build_index(emb, list(c), cfg, corpus_sha256="c", encoder_fingerprint="e")
    ix.save_index(idx, out)
    return idx


@pytest.mark.parametrize("cfg", KINDS, ids=[k.kind for k in KINDS])
def test_edit_add_delete_encodes_only_changed_and_equals_full_rebuild(
        tmp_path: Path, cfg: IndexConfig) -> None:
    c0, c1 = corpus(300), edited(corpus(300))
    enc = CountingEncoder()
    cache_root = tmp_path / "cache"
    build(c0, ec.EmbeddingCache(cache_root, CONTEXT), enc, cfg, tmp_path / "first")
    assert enc.calls == 1 and len(enc.texts) == 300

    enc = CountingEncoder()
    incr = build(c1, ec.EmbeddingCache(cache_root, CONTEXT), enc, cfg, tmp_path / "incr")
    assert enc.calls == 1
    assert sorted(enc.texts) == sorted([c1["p3"], c1["p-new"]])  # the edit and the addition

    full_enc = CountingEncoder()
    full = build(c1, None, full_enc, cfg, tmp_path / "full")
    assert len(full_enc.texts) == len(c1)
    assert incr.meta.index_sha256 == full.meta.index_sha256  # the same index file, byte for byte
    q = CountingEncoder()(["topic 3", "a brand new passage", "passage number 4 about topic 4"])
    assert ix.search(incr, q, 10)[1] == ix.search(full, q, 10)[1]

    enc = CountingEncoder()  # nothing changed: nothing encoded, the cache is not rewritten
    mtime = (ec.EmbeddingCache(cache_root, CONTEXT).dir / ec.VECTORS_FILE).stat().st_mtime_ns
    build(c1, ec.EmbeddingCache(cache_root, CONTEXT), enc, cfg, tmp_path / "again")
    assert enc.calls == 0
    assert (ec.EmbeddingCache(cache_root, CONTEXT).dir / ec.VECTORS_FILE).stat().st_mtime_ns == (
        mtime)


def test_full_build_is_one_plain_encode_call_in_corpus_order(tmp_path: Path) -> None:
    c = corpus(20)
    enc = CountingEncoder()
    emb, stats = ec.encode_with_cache(list(c.values()), 256, enc,
                                      ec.EmbeddingCache(tmp_path, CONTEXT))
    assert enc.calls == 1 and enc.texts == list(c.values())  # what the uncached build did
    np.testing.assert_array_equal(emb, CountingEncoder()(list(c.values())))
    assert (stats.n_passages, stats.n_cached, stats.n_encoded) == (20, 0, 20)


@pytest.mark.parametrize("field", sorted(CONTEXT))
def test_cache_of_another_encoding_context_is_never_used(tmp_path: Path, field: str) -> None:
    c = corpus(10)
    ec.encode_with_cache(list(c.values()), 256, CountingEncoder(),
                         ec.EmbeddingCache(tmp_path, CONTEXT))
    other = {**CONTEXT, field: "something else"}
    enc = CountingEncoder()
    _, stats = ec.encode_with_cache(list(c.values()), 256, enc,
                                    ec.EmbeddingCache(tmp_path, other))
    assert len(enc.texts) == 10 and stats.n_cached == 0
    enc = CountingEncoder()  # another max length is another key, even in the same context
    ec.encode_with_cache(list(c.values()), 128, enc, ec.EmbeddingCache(tmp_path, CONTEXT))
    assert len(enc.texts) == 10


def test_cache_whose_context_file_disagrees_is_ignored(tmp_path: Path) -> None:
    c = corpus(10)
    cache = ec.EmbeddingCache(tmp_path, CONTEXT)
    ec.encode_with_cache(list(c.values()), 256, CountingEncoder(), cache)
    (cache.dir / ec.CONTEXT_FILE).write_text(json.dumps({**cache.context,
                                                          "encoder_fingerprint": "x"}))
    assert ec.EmbeddingCache(tmp_path, CONTEXT).rows == {}
    (cache.dir / ec.VECTORS_FILE).write_bytes(b"garbage")
    assert ec.EmbeddingCache(tmp_path, CONTEXT).rows == {}


def test_going_back_to_the_previous_corpus_is_cached(tmp_path: Path) -> None:
    c0, c1 = corpus(10), edited(corpus(10))
    for c in (c0, c1):
        ec.encode_with_cache(list(c.values()), 256, CountingEncoder(),
                             ec.EmbeddingCache(tmp_path, CONTEXT))
    enc = CountingEncoder()
    ec.encode_with_cache(list(c0.values()), 256, enc, ec.EmbeddingCache(tmp_path, CONTEXT))
    assert enc.calls == 0  # the old p3 and p5 rows were kept


def _write_corpus(path: Path, c: dict[str, str]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps({"passage_id": k, "doc_id": "d", "title": "T",
                                        "text": v}) + "\n" for k, v in c.items()))


def test_run_build_index_reencodes_only_the_edit(tmp_path: Path, tiny_bert_dir: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    from ragtrain.pipeline.paths import Paths
    from ragtrain.pipeline.retrieval import run_build_index
    from ragtrain.retrieval.encoder import BiEncoder, EncoderSpec

    paths = Paths(root=tmp_path)
    BiEncoder.from_pretrained(EncoderSpec(str(tiny_bert_dir))).save(paths.retriever)
    cfg = Config()
    cfg = dataclasses.replace(cfg, retriever=dataclasses.replace(cfg.retriever, precision="fp32"),
                              index=dataclasses.replace(cfg.index, device="cpu",
                                                        embedding_cache=True))
    seen: list[str] = []
    plain = BiEncoder.encode_passages

    def counting(self: BiEncoder, texts: list[str], *a: object, **kw: object) -> np.ndarray:
        seen.extend(texts)
        return plain(self, texts, *a, **kw)  # type: ignore[arg-type]

    monkeypatch.setattr(BiEncoder, "encode_passages", counting)
    c0 = corpus(12)
    _write_corpus(paths.corpus, c0)
    run_build_index(cfg, paths)
    first = np.load(paths.embeddings / "embeddings.npy")
    assert len(seen) == 12

    seen.clear()
    c1 = edited(c0)
    _write_corpus(paths.corpus, c1)
    run_build_index(cfg, paths)
    assert sorted(seen) == sorted([f"T. {c1['p3']}", f"T. {c1['p-new']}"])
    incr = np.load(paths.embeddings / "embeddings.npy")
    kept = [i for i, k in enumerate(c0) if k in c1 and c0[k] == c1[k]]
    np.testing.assert_array_equal(incr[[list(c1).index(list(c0)[i]) for i in kept]], first[kept])
    incr_idx = ix.load_index(paths.index, device="cpu")

    import shutil
    shutil.rmtree(paths.embedding_cache)  # a full rebuild
    seen.clear()
    run_build_index(cfg, paths)
    assert len(seen) == len(c1)
    full = np.load(paths.embeddings / "embeddings.npy")
    # fp32: a passage's embedding moves with its batch mates by float noise only
    np.testing.assert_allclose(incr, full, atol=1e-5)
    full_idx = ix.load_index(paths.index, device="cpu")
    assert incr_idx.passage_ids == full_idx.passage_ids == list(c1)
    assert ix.search(incr_idx, full[:5], 5)[1] == ix.search(full_idx, full[:5], 5)[1]

    seen.clear()  # another encoder (retrained weights): nothing from the old cache is used
    model = BiEncoder.load(paths.retriever)
    with __import__("torch").no_grad():
        next(model.parameters()).add_(0.01)
    model.save(paths.retriever)
    run_build_index(cfg, paths)
    assert len(seen) == len(c1)
