"""The data stages: fetch the source, then read, validate, chunk and split it."""

from __future__ import annotations

from typing import Any

from ragtrain.config import Config
from ragtrain.io import atomic_path, atomic_write_json, write_jsonl
from ragtrain.pipeline.paths import Paths


def run_fetch(cfg: Config, paths: Paths) -> dict[str, Any]:
    """Copy or download data.source into data/raw, verifying data.sha256."""
    from ragtrain.data import source

    return source.fetch_source(cfg.data.source, cfg.data.sha256, paths.raw, root=paths.root,
                               timeout_s=cfg.data.download_timeout_s)


def run_prepare(cfg: Config, paths: Paths) -> dict[str, Any]:
    """data/raw -> data/prepared/{corpus,train,dev,test}.jsonl and metrics/prepare.json."""
    from ragtrain.data import formats, source
    from ragtrain.data import prepare as data

    ds = formats.read_dataset(source.raw_payload(paths.raw), cfg.data.format)
    prepared = data.prepare_dataset(ds, cfg.data)
    with atomic_path(paths.prepared) as tmp:
        tmp.mkdir()
        write_jsonl(tmp / paths.corpus.name, data.passage_rows(prepared.passages))
        for split, rows in prepared.queries.items():
            write_jsonl(tmp / paths.queries(split).name, rows)
    atomic_write_json(paths.prepare_metrics, prepared.stats)
    return prepared.stats
