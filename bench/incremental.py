"""A 1% corpus edit: the incremental build_index (embedding cache) against a full rebuild.

    python bench/incremental.py [--root .] [--edit-fraction 0.01]   # after `make demo`

Reads ROOT/data/prepared/{corpus,test}.jsonl, ROOT/artifacts/retriever and (when its encoder
fingerprint matches) ROOT/artifacts/embeddings, read-only; works in a temp folder. The cache
starts as the previous build left it (seeded from ROOT/artifacts/embeddings, or one cold full
build when there is none). Then a seeded 1% of the passages is edited (a sentence appended),
and `run_build_index` runs twice on the edited corpus: incremental (the cache as is), then a
full rebuild (cache removed), each timed end to end (model load, fingerprint, encoding, index
build, save). Prints both times and their ratio, and compares the two builds: embeddings
(rows bit-equal, max difference) and the top-20 passages of every test question.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from ragtrain import runtime
from ragtrain.config import load_config
from ragtrain.data.corpus import Corpus
from ragtrain.io import read_jsonl
from ragtrain.pipeline.paths import Paths
from ragtrain.pipeline.retrieval import embedding_cache, run_build_index
from ragtrain.retrieval.embedding_cache import passage_key
from ragtrain.retrieval.encoder import BiEncoder
from ragtrain.retrieval.index import load_index, search
from ragtrain.retrieval.windows import passage_windows


def timed_build(cfg, paths: Paths) -> float:  # noqa: ANN001
    t = time.perf_counter()
    run_build_index(cfg, paths)
    return time.perf_counter() - t


def seed_cache(cfg, paths: Paths, root: Path, corpus: Corpus) -> bool:  # noqa: ANN001
    """Fill the cache from ROOT's artifacts/embeddings (the previous build) when they match."""
    meta_file = root / "artifacts" / "embeddings" / "meta.json"
    model = BiEncoder.load(paths.retriever)
    if not meta_file.is_file():
        return False
    meta = json.loads(meta_file.read_text())
    fp = model.fingerprint()
    texts, owners = passage_windows(corpus.passages, cfg.index.window_words,
                                    cfg.index.window_stride)  # what build-index encodes
    if meta["encoder_fingerprint"] != fp or meta["passage_ids"] != owners:
        return False
    emb = np.load(root / "artifacts" / "embeddings" / "embeddings.npy")
    cache = embedding_cache(paths, fp, model.spec.pooling,
                            "bf16" if runtime.use_bf16(cfg.retriever.precision) else "fp32")
    cache.save([passage_key(t, model.spec.passage_max_length) for t in texts], emb)
    return True


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--root", type=Path, default=Path("."))
    ap.add_argument("--params", type=Path, default=Path("params.yaml"))
    ap.add_argument("--edit-fraction", type=float, default=0.01)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("-k", type=int, default=20)
    args = ap.parse_args()
    cfg = load_config(args.params, {"index.embedding_cache": True})  # what it measures
    root = args.root.resolve()
    work = Path(tempfile.mkdtemp(prefix="incremental-"))
    paths = Paths(root=work)
    paths.corpus.parent.mkdir(parents=True)
    shutil.copy(root / "data" / "prepared" / "corpus.jsonl", paths.corpus)
    paths.retriever.parent.mkdir(parents=True)
    paths.retriever.symlink_to(root / "artifacts" / "retriever")  # read only
    corpus = Corpus.load(paths.corpus)

    if seed_cache(cfg, paths, root, corpus):
        print(f"cache seeded from {root}/artifacts/embeddings ({len(corpus.ids)} passages)")
    else:
        print(f"cold full build of the original corpus: {timed_build(cfg, paths):.1f} s")

    rng = np.random.default_rng(args.seed)
    n_edit = max(1, round(args.edit_fraction * len(corpus.ids)))
    chosen = set(rng.choice(len(corpus.ids), n_edit, replace=False).tolist())
    rows = list(read_jsonl(paths.corpus))
    for i in chosen:
        rows[i]["text"] += " This paragraph was edited for the incremental benchmark."
    paths.corpus.write_text("".join(json.dumps(r) + "\n" for r in rows))
    print(f"edited {n_edit} of {len(rows)} passages ({args.edit_fraction:.1%})")

    t_incr = timed_build(cfg, paths)
    incr_emb = np.load(paths.embeddings / "embeddings.npy")
    shutil.copytree(paths.index, work / "index_incremental")
    shutil.rmtree(paths.embedding_cache)
    t_full = timed_build(cfg, paths)
    full_emb = np.load(paths.embeddings / "embeddings.npy")

    model = BiEncoder.load(paths.retriever)
    questions = [r["question"] for r in read_jsonl(root / "data" / "prepared" / "test.jsonl")]
    with runtime.autocast(runtime.use_bf16(cfg.retriever.precision)):
        q = model.encode_queries(questions, 128)
    a = search(load_index(work / "index_incremental", device="cpu"), q, args.k)[1]
    b = search(load_index(paths.index, device="cpu"), q, args.k)[1]
    same_k = sum(x == y for x, y in zip(a, b, strict=True))
    same_1 = sum(x[0] == y[0] for x, y in zip(a, b, strict=True))
    same_set = sum(set(x) == set(y) for x, y in zip(a, b, strict=True))
    equal_rows = int((incr_emb == full_emb).all(axis=1).sum())

    print(f"incremental build_index: {t_incr:6.1f} s  ({n_edit} passages encoded)")
    print(f"full rebuild:            {t_full:6.1f} s  ({len(rows)} passages encoded)")
    print(f"speed-up: {t_full / t_incr:.1f}x (target >= 20x)")
    print(f"embeddings: {equal_rows} of {len(full_emb)} rows bit-equal, max |diff| "
          f"{float(np.abs(incr_emb - full_emb).max()):.2e}")
    print(f"search, {len(questions)} test questions: top-{args.k} lists identical "
          f"{same_k}/{len(questions)}, same top-{args.k} sets {same_set}, same top-1 {same_1}")
    shutil.rmtree(work)
    return 0 if same_1 == len(questions) else 1


if __name__ == "__main__":
    sys.exit(main())
