from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from pathlib import Path

import faiss
import numpy as np
import pytest
import torch

from ragtrain.config import IndexConfig
from ragtrain.errors import IndexFileError, IndexMismatchError, RagtrainError, RetrievalError
from ragtrain.retrieval import index as ix

VOCAB = ["cat", "dog", "fish", "bird", "tree", "car"]
PASSAGES = {
    "p-cat": "the cat sleeps",
    "p-dog": "a dog barks",
    "p-catdog": "cat and dog play",
    "p-fish": "fish swim",
    "p-tree": "a tall tree",
}
CPU = IndexConfig(kind="flat", device="cpu", window_words=0)  # one vector per passage


@pytest.fixture(autouse=True)
def one_faiss_thread() -> Iterator[None]:
    """OpenMP barriers spin; on a busy 2-core box k-means then takes seconds, not 0.1 s."""
    n = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(1)
    yield
    faiss.omp_set_num_threads(n)


def fake_encode(texts: list[str]) -> np.ndarray:
    """Keyword -> one-hot dimension, L2-normalised: top-k is known by hand."""
    x = np.zeros((len(texts), len(VOCAB)), dtype=np.float32)  # (n, dim)
    for i, t in enumerate(texts):
        for w in t.split():
            if w in VOCAB:
                x[i, VOCAB.index(w)] = 1.0
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    return x / np.where(norms > 0, norms, 1.0)


def unit(rng: np.random.Generator, n: int, dim: int) -> np.ndarray:
    x = rng.standard_normal((n, dim)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def tiny_index(kind: str = "flat") -> ix.DenseIndex:
    ids = list(PASSAGES)
    emb = fake_encode(list(PASSAGES.values()))
    return ix.build_index(emb, ids, IndexConfig(kind=kind, device="cpu"),
                          corpus_sha256="c" * 64, encoder_fingerprint="e" * 64)


def test_fake_encoder_top_k_is_known_by_hand() -> None:
    idx = tiny_index()
    scores, ids = ix.search(idx, fake_encode(["cat", "dog", "fish"]), k=2)
    assert scores.shape == (3, 2)
    assert ids[0] == ["p-cat", "p-catdog"]  # 1.0, then 1/sqrt(2)
    assert ids[1] == ["p-dog", "p-catdog"]
    assert ids[2][0] == "p-fish"
    np.testing.assert_allclose(scores[0], [1.0, 1 / np.sqrt(2)], rtol=1e-6)


def test_flat_equals_brute_force() -> None:
    rng = np.random.default_rng(0)
    p, q = unit(rng, 200, 16), unit(rng, 7, 16)
    idx = ix.build_index(p, [f"p{i}" for i in range(200)], CPU, corpus_sha256="c",
                         encoder_fingerprint="e")
    scores, ids = ix.search(idx, q, k=10)
    brute = q @ p.T  # (n_queries, n_passages)
    order = np.argsort(-brute, axis=1)[:, :10]  # (n_queries, k)
    assert ids == [[f"p{j}" for j in row] for row in order]
    np.testing.assert_allclose(scores, np.take_along_axis(brute, order, axis=1), atol=1e-5)


@pytest.mark.parametrize(
    "cfg",
    [
        IndexConfig(kind="hnsw", hnsw_m=16, hnsw_ef_construction=40, hnsw_ef_search=64,
                    device="cpu"),
        IndexConfig(kind="ivfpq", ivf_nlist=16, ivf_nprobe=16, pq_m=16, pq_bits=6,
                    device="cpu"),
    ],
    ids=["hnsw", "ivfpq"],
)
def test_approximate_recall_vs_flat(cfg: IndexConfig) -> None:
    rng = np.random.default_rng(1)
    p, q = unit(rng, 2000, 32), unit(rng, 50, 32)
    ids = [f"p{i}" for i in range(2000)]
    exact = ix.build_index(p, ids, CPU, corpus_sha256="c", encoder_fingerprint="e")
    approx = ix.build_index(p, ids, cfg, corpus_sha256="c", encoder_fingerprint="e")
    _, true_ids = ix.search(exact, q, k=1)
    _, got_ids = ix.search(approx, q, k=10)
    recall = np.mean([t[0] in g for t, g in zip(true_ids, got_ids, strict=True)])  # R@10 of NN
    assert recall >= 0.9, recall
    assert approx.meta.kind == cfg.kind


def test_ivfpq_build_is_deterministic_and_records_effective_params(tmp_path: Path) -> None:
    rng = np.random.default_rng(2)
    p = unit(rng, 600, 16)
    cfg = IndexConfig(kind="ivfpq", ivf_nlist=64, ivf_nprobe=32, pq_m=4, pq_bits=6, device="cpu")
    a = ix.build_index(p, [str(i) for i in range(600)], cfg, corpus_sha256="c",
                       encoder_fingerprint="e", seed=3)
    b = ix.build_index(p, [str(i) for i in range(600)], cfg, corpus_sha256="c",
                       encoder_fingerprint="e", seed=3)
    ix.save_index(a, tmp_path / "a")
    ix.save_index(b, tmp_path / "b")
    assert a.meta.index_sha256 == b.meta.index_sha256 != ""
    assert a.meta.params["nlist"] == 600 // 39  # reduced: faiss wants 39 points per list
    assert a.meta.params["nprobe"] == 600 // 39


def test_ivfpq_constraints_are_clear_errors() -> None:
    p = unit(np.random.default_rng(3), 300, 12)
    ids = [str(i) for i in range(300)]
    with pytest.raises(RetrievalError, match="pq_m: must divide the embedding dimension 12"):
        ix.build_index(p, ids, IndexConfig(kind="ivfpq", pq_m=5, device="cpu"),
                       corpus_sha256="c", encoder_fingerprint="e")
    with pytest.raises(RetrievalError, match="needs at least 256"):
        ix.build_index(p[:100], ids[:100], IndexConfig(kind="ivfpq", pq_m=4, device="cpu"),
                       corpus_sha256="c", encoder_fingerprint="e")


def test_save_load_round_trip(tmp_path: Path) -> None:
    idx = tiny_index("hnsw")
    ix.save_index(idx, tmp_path / "index")
    assert sorted(p.name for p in (tmp_path / "index").iterdir()) == [
        "index.faiss", "meta.json", "passage_ids.json"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["index"]  # no temp leftovers
    loaded = ix.load_index(tmp_path / "index", expect_encoder_fingerprint="e" * 64,
                           expect_corpus_sha256="c" * 64, device="cpu")
    assert loaded.meta == idx.meta
    assert loaded.passage_ids == list(PASSAGES)
    assert loaded.index.hnsw.efSearch == IndexConfig().hnsw_ef_search
    q = fake_encode(["cat dog", "tree"])
    s1, i1 = ix.search(idx, q, 3)
    s2, i2 = ix.search(loaded, q, 3)
    assert i1 == i2
    np.testing.assert_array_equal(s1, s2)


def test_corrupted_index_file_is_refused(tmp_path: Path) -> None:
    ix.save_index(tiny_index(), tmp_path / "index")
    f = tmp_path / "index" / "index.faiss"
    data = bytearray(f.read_bytes())
    data[-1] ^= 0xFF
    f.write_bytes(bytes(data))
    with pytest.raises(IndexFileError, match=r"index\.faiss: corrupted"):
        ix.load_index(tmp_path / "index")


def test_unreadable_index_file_is_refused_even_with_matching_hash(tmp_path: Path) -> None:
    ix.save_index(tiny_index(), tmp_path / "index")
    f = tmp_path / "index" / "index.faiss"
    f.write_bytes(b"garbage")
    meta_path = tmp_path / "index" / "meta.json"
    meta = json.loads(meta_path.read_text())
    meta["index_sha256"] = ix.sha256_file(f)
    meta_path.write_text(json.dumps(meta))
    with pytest.raises(IndexFileError, match="faiss cannot read it"):
        ix.load_index(tmp_path / "index")


@pytest.mark.parametrize("missing", ["", "index.faiss", "meta.json", "passage_ids.json"])
def test_missing_folder_or_file_is_named(tmp_path: Path, missing: str) -> None:
    ix.save_index(tiny_index(), tmp_path / "index")
    if missing:
        (tmp_path / "index" / missing).unlink()
        target = tmp_path / "index"
    else:
        target = tmp_path / "nowhere"
    with pytest.raises(IndexFileError, match=missing or "nowhere"):
        ix.load_index(target)


def test_ids_count_mismatch_is_refused(tmp_path: Path) -> None:
    ix.save_index(tiny_index(), tmp_path / "index")
    (tmp_path / "index" / "passage_ids.json").write_text(json.dumps(["a", "b"]))
    with pytest.raises(IndexFileError, match="2 ids of 2 passages, but index.faiss holds 5"):
        ix.load_index(tmp_path / "index")


def test_fingerprint_and_corpus_mismatch_refused(tmp_path: Path) -> None:
    ix.save_index(tiny_index(), tmp_path / "index")
    with pytest.raises(IndexMismatchError,
                       match=f"built by encoder {'e' * 64}, but the query encoder is other.*"
                             r"rebuild the index \(ragtrain build-index\)"):
        ix.load_index(tmp_path / "index", expect_encoder_fingerprint="other")
    with pytest.raises(IndexMismatchError, match="built from corpus"):
        ix.load_index(tmp_path / "index", expect_corpus_sha256="d" * 64)


def test_search_errors() -> None:
    idx = tiny_index()
    with pytest.raises(RetrievalError, match="dimension 4, but the index has dimension 6"):
        ix.search(idx, np.ones((1, 4), dtype=np.float32), 1)
    for bad_k in (0, 6, 2.0):
        with pytest.raises(RetrievalError, match="between 1 and 5"):
            ix.search(idx, fake_encode(["cat"]), bad_k)  # type: ignore[arg-type]
    q = fake_encode(["cat", "dog"])
    q[1, 0] = np.nan
    with pytest.raises(RetrievalError, match="query embeddings.*first bad row: 1"):
        ix.search(idx, q, 1)


def test_validate_embeddings() -> None:
    x = np.ones((3, 2), dtype=np.float64)
    out = ix.validate_embeddings(x, "x")
    assert out.dtype == np.float32 and out.flags.c_contiguous
    x[2, 1] = np.inf
    with pytest.raises(RetrievalError, match="passages: 1 row.*first bad row: 2"):
        ix.validate_embeddings(x, "passages")
    with pytest.raises(RetrievalError, match="2-D"):
        ix.validate_embeddings(np.ones(3), "x")
    with pytest.raises(RetrievalError, match="empty"):
        ix.validate_embeddings(np.ones((0, 3)), "x")
    with pytest.raises(RetrievalError, match="first bad row: 0"):
        ix.validate_embeddings(np.array([[1e300, 0.0]]), "x")  # overflows float32


def test_build_rejects_bad_ids_and_nan() -> None:
    emb = fake_encode(["cat", "dog"])
    with pytest.raises(RetrievalError, match="1 passage ids for 2"):
        ix.build_index(emb, ["a"], CPU, corpus_sha256="c", encoder_fingerprint="e")
    with pytest.raises(RetrievalError, match="duplicate passage id 'a'"):
        ix.build_index(emb, ["a", "a"], CPU, corpus_sha256="c", encoder_fingerprint="e")
    emb[0, 0] = np.nan
    with pytest.raises(RetrievalError, match="passage embeddings.*first bad row: 0"):
        ix.build_index(emb, ["a", "b"], CPU, corpus_sha256="c", encoder_fingerprint="e")


def test_device_resolution_without_gpu(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(ix, "_gpu_available", lambda: False)
    assert ix._resolve_device("auto", "flat") == "cpu"
    assert ix._resolve_device("cpu", "ivfpq") == "cpu"
    with pytest.raises(RagtrainError, match="'gpu' requested"):
        ix._resolve_device("gpu", "flat")
    monkeypatch.setattr(ix, "_gpu_available", lambda: True)
    assert ix._resolve_device("auto", "flat") == "gpu"
    assert ix._resolve_device("auto", "hnsw") == "cpu"  # faiss has no GPU HNSW
    with pytest.raises(RagtrainError, match="no GPU HNSW"):
        ix._resolve_device("gpu", "hnsw")


def test_fingerprint_state_dict() -> None:
    a = {"w": torch.arange(6, dtype=torch.float32).reshape(2, 3), "b": torch.zeros(3)}
    fp = ix.fingerprint_state_dict(a)
    # by hand: names sorted ("b" before "w"), each as name, dtype, shape, then its raw bytes
    h = hashlib.sha256()
    for name in ("b", "w"):
        t = a[name]
        h.update(f"{name}\0{t.dtype}\0{tuple(t.shape)}\0".encode() + t.numpy().tobytes())
    assert fp == h.hexdigest()
    assert fp == ix.fingerprint_state_dict(dict(reversed(list(a.items()))))  # order-free
    changed = {**a, "b": torch.tensor([0.0, 0.0, 1e-7])}
    assert ix.fingerprint_state_dict(changed) != fp
    assert ix.fingerprint_state_dict({**a, "w": a["w"].reshape(3, 2)}) != fp  # shape counts
    assert ix.fingerprint_state_dict({**a, "b": torch.zeros(3, dtype=torch.float64)}) != fp
    assert ix.fingerprint_state_dict({"w2": a["w"], "b": a["b"]}) != fp  # names count
    bf16 = ix.fingerprint_state_dict({"x": torch.ones(2, dtype=torch.bfloat16)})
    # bfloat16 1.0 is 0x3F80, stored little-endian (numpy has no bfloat16 to do this for us)
    assert bf16 == hashlib.sha256(b"x\0torch.bfloat16\0(2,)\0" + b"\x80\x3f" * 2).hexdigest()


def test_sha256_file(tmp_path: Path) -> None:
    f = tmp_path / "f"
    f.write_bytes(b"abc")
    assert ix.sha256_file(f) == (
        "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad")


# ----------------------------------------------------------------- built from a saved .npy


@pytest.mark.parametrize("cfg", [
    IndexConfig(kind="flat"),
    # 3,000 vectors > the sample (100 per list x 8 lists, at least 39 x 2**4): trained on it
    IndexConfig(kind="ivfpq", ivf_nlist=8, ivf_nprobe=4, pq_m=8, pq_bits=4),
    IndexConfig(kind="ivfpq", ivf_nlist=8, ivf_nprobe=4, pq_m=8, pq_bits=4,
                refine_k_factor=4, refine_store="sq8"),
    IndexConfig(kind="ivfpq", ivf_nlist=64, ivf_nprobe=4, pq_m=8, pq_bits=4),  # all trained
], ids=["flat", "ivfpq-sampled", "ivfpq-sq8-refine", "ivfpq-all"])
def test_build_from_npy_equals_build_in_memory(tmp_path: Path, cfg: IndexConfig) -> None:
    """Read 700 rows at a time (5 chunks, the last one short): the same index, byte for byte."""
    x = unit(np.random.default_rng(3), 3000, 32)
    ids = [f"p{i}" for i in range(len(x))]
    np.save(tmp_path / "e.npy", x)
    kw = {"corpus_sha256": "c", "encoder_fingerprint": "e", "seed": 1}
    a = ix.build_index(x, ids, cfg, **kw)
    b = ix.build_index_from_npy(tmp_path / "e.npy", ids, cfg, chunk_rows=700, **kw)
    assert bytes(faiss.serialize_index(a.index)) == bytes(faiss.serialize_index(b.index))
    assert a.meta == b.meta and a.passage_ids == b.passage_ids
    rows = ix.training_rows(len(x), cfg, 1)
    if cfg.kind == "ivfpq" and cfg.ivf_nlist == 8:
        assert rows is not None and len(rows) == 800 and list(rows) == sorted(set(rows))
    else:
        assert rows is None
    q = unit(np.random.default_rng(4), 5, 32)
    assert ix.search(a, q, 5)[1] == ix.search(b, q, 5)[1]


def test_build_from_npy_refuses_bad_files(tmp_path: Path) -> None:
    cfg = IndexConfig(kind="flat")
    kw = {"corpus_sha256": "c", "encoder_fingerprint": "e"}
    np.save(tmp_path / "f64.npy", np.ones((4, 3)))
    with pytest.raises(RetrievalError, match=r"f64.npy: expected a C-order float32"):
        ix.build_index_from_npy(tmp_path / "f64.npy", ["a", "b", "c", "d"], cfg, **kw)
    x = unit(np.random.default_rng(0), 10, 8)
    np.save(tmp_path / "cut.npy", x)
    data = (tmp_path / "cut.npy").read_bytes()
    (tmp_path / "cut.npy").write_bytes(data[:-40])  # the last rows lost
    with pytest.raises(RetrievalError, match=r"cut.npy: truncated"):
        ix.build_index_from_npy(tmp_path / "cut.npy", [str(i) for i in range(10)], cfg, **kw)
    bad = x.copy()
    bad[7, 2] = np.nan
    np.save(tmp_path / "nan.npy", bad)
    with pytest.raises(RetrievalError, match=r"nan.npy\).*NaN or inf"):
        ix.build_index_from_npy(tmp_path / "nan.npy", [str(i) for i in range(10)], cfg, **kw)
    (tmp_path / "junk.npy").write_text("not numpy")
    with pytest.raises(RetrievalError, match=r"junk.npy: not a readable .npy file"):
        ix.build_index_from_npy(tmp_path / "junk.npy", ["a"], cfg, **kw)


def _mapped(path: Path) -> bool:
    """Whether this process memory-maps ``path`` (Linux /proc/self/maps)."""
    return str(path.resolve()) in Path("/proc/self/maps").read_text()


@pytest.mark.parametrize("cfg", [
    IndexConfig(kind="flat"),
    IndexConfig(kind="hnsw", hnsw_m=8),
    IndexConfig(kind="ivfpq", ivf_nlist=8, ivf_nprobe=4, pq_m=8, pq_bits=4),
    IndexConfig(kind="ivfpq", ivf_nlist=8, ivf_nprobe=4, pq_m=8, pq_bits=4,
                refine_k_factor=4, refine_store="sq8"),
], ids=["flat", "hnsw", "ivfpq", "ivfpq-sq8-refine"])
def test_mmap_load_searches_from_the_file_with_the_same_results(tmp_path: Path,
                                                                cfg: IndexConfig) -> None:
    """index.mmap: the saved file is mapped (not read into memory) and answers as the loaded
    index does, scores included."""
    x = unit(np.random.default_rng(5), 1500, 32)
    ids = [f"p{i}" for i in range(len(x))]
    ix.save_index(ix.build_index(x, ids, cfg, corpus_sha256="c", encoder_fingerprint="e"),
                  tmp_path / "idx")
    q = unit(np.random.default_rng(6), 20, 32)
    loaded = ix.load_index(tmp_path / "idx", device="cpu")
    assert not _mapped(tmp_path / "idx" / ix.INDEX_FILE)
    mapped = ix.load_index(tmp_path / "idx", device="cpu", mmap=True)
    assert _mapped(tmp_path / "idx" / ix.INDEX_FILE)
    (s1, i1), (s2, i2) = ix.search(loaded, q, 10), ix.search(mapped, q, 10)
    assert i1 == i2 and np.array_equal(s1, s2)
    if cfg.kind == "ivfpq" and not cfg.refine_k_factor:  # the inverted lists are the mapped part
        lists = faiss.extract_index_ivf(mapped.index).invlists
        assert isinstance(faiss.downcast_InvertedLists(lists), faiss.OnDiskInvertedLists)
    del mapped
