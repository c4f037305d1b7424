"""One function per pipeline stage: the seam that both `dvc.yaml` (via the CLI) and `flows/` call.

Each stage is a function of files in and files out (paths below), so it can run anywhere.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ragtrain import data, source
from ragtrain.config import Config
from ragtrain.io import atomic_path, atomic_write_json, write_jsonl


@dataclass(frozen=True)
class Paths:
    """Every file a stage reads or writes, relative to the repo root (as in dvc.yaml)."""

    root: Path = Path(".")

    def _p(self, rel: str) -> Path:
        return self.root / rel

    @property
    def raw(self) -> Path:
        return self._p("data/raw")

    @property
    def prepared(self) -> Path:
        return self._p("data/prepared")

    @property
    def corpus(self) -> Path:
        return self.prepared / "corpus.jsonl"

    def queries(self, split: str) -> Path:
        return self.prepared / f"{split}.jsonl"

    @property
    def metrics(self) -> Path:
        return self._p("metrics")

    @property
    def prepare_metrics(self) -> Path:
        return self.metrics / "prepare.json"


def run_fetch(cfg: Config, paths: Paths) -> dict[str, Any]:
    """Copy or download data.source into data/raw, verifying data.sha256."""
    return source.fetch_source(cfg.data.source, cfg.data.sha256, paths.raw, root=paths.root,
                               timeout_s=cfg.data.download_timeout_s)


def run_prepare(cfg: Config, paths: Paths) -> dict[str, Any]:
    """data/raw -> data/prepared/{corpus,train,dev,test}.jsonl and metrics/prepare.json."""
    ds = data.read_dataset(source.raw_payload(paths.raw), cfg.data.format)
    prepared = data.prepare_dataset(ds, cfg.data)
    with atomic_path(paths.prepared) as tmp:
        tmp.mkdir()
        write_jsonl(tmp / paths.corpus.name, data.passage_rows(prepared.passages))
        for split, rows in prepared.queries.items():
            write_jsonl(tmp / paths.queries(split).name, rows)
    atomic_write_json(paths.prepare_metrics, prepared.stats)
    return prepared.stats
