"""Each stage's DVC params are exactly the config keys it reads: a key it reads but does not
declare would leave its outputs stale when params.yaml changes under `dvc repro`; a key it
declares but never reads reruns it for nothing (e.g. a 15-minute reranker training for an
inference-only setting). The stages run on a tiny project with every optional part on (reranker,
distillation, abstention, joint training) while the loaded config records each field read."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from ragtrain import cli, config
from ragtrain.pipeline.stages import STAGES
from tests.conftest import FIXTURES, TINY_RAG_PARAMS
from tests.test_joint import JOINT_PARAMS
from tests.test_reranker import RERANKER_SECTION

# Read without changing what a stage writes: MLflow logging, how long a download may take, how
# an index is searched (the same results on the CPU or a GPU, memory-mapped or not; `package`
# does declare these: the bundle's manifest records them).
OPERATIONAL = ("tracking.", "data.download_timeout_s", "index.device", "index.mmap")
NOT_OUTPUTS = {("evaluate", "retriever.kind")}  # the printed summary's label only
# Declared, and read only on a path the tiny project does not take.
CONDITIONAL = {("prepare", "data.chunk_overlap"),  # both only when data.chunk_tokens > 0
               ("prepare", "data.chunk_tokenizer")}


class Reads:
    """Within ``record(monkeypatch)``, the dotted keys of the loaded config's fields read (not
    while loading it: its own validation reads them all; not of copies made later)."""

    def __init__(self) -> None:
        self.keys: set[str] = set()
        self.where: dict[int, str] = {}  # id of the loaded config and its sections -> place

    def record(self, monkeypatch: pytest.MonkeyPatch) -> None:
        classes: set[type] = set()

        def walk(obj: object, prefix: str, into: dict[int, str] | None) -> None:
            classes.add(type(obj))
            if into is not None:
                into[id(obj)] = prefix
            for f in dataclasses.fields(obj):  # type: ignore[arg-type]
                v = getattr(obj, f.name)
                if dataclasses.is_dataclass(v):
                    walk(v, f"{prefix}{f.name}.", into)

        walk(config.Config(), "", None)
        for cls in classes:
            names = {f.name for f in dataclasses.fields(cls)}

            def read(obj: object, name: str, _names: set[str] = names) -> object:
                value = object.__getattribute__(obj, name)
                place = self.where.get(id(obj))
                if place is not None and name in _names and not dataclasses.is_dataclass(value):
                    self.keys.add(place + name)
                return value

            monkeypatch.setattr(cls, "__getattribute__", read, raising=False)
        load = cli.load_config

        def loaded(*args: object, **kwargs: object) -> config.Config:
            cfg = load(*args, **kwargs)
            places: dict[int, str] = {}
            walk(cfg, "", places)  # (its reads go unrecorded: the places are not known yet)
            self.where.update(places)
            return cfg

        monkeypatch.setattr(cli, "load_config", loaded)


def covered(key: str, params: tuple[str, ...]) -> bool:
    return any(key == p or key.startswith(p + ".") for p in params)


EVERYTHING = TINY_RAG_PARAMS.replace("retriever:\n", "retriever:\n  loss: distill\n"
                                     "  hard_negatives_per_query: 2\n", 1) + JOINT_PARAMS \
    + RERANKER_SECTION.replace("{enabled}", "true") + "abstention:\n  enabled: true\n"


def test_each_stage_declares_exactly_the_params_it_reads(
        tmp_path: Path, tiny_bert_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "params.yaml").write_text(EVERYTHING.format(
        source=FIXTURES / "tiny_jsonl", bert=tiny_bert_dir, tracked="false",
        uri="sqlite:///mlruns/mlflow.db"))
    monkeypatch.chdir(tmp_path)
    undeclared, unread = [], []
    for name, stage in STAGES.items():  # in DAG order
        reads = Reads()
        with monkeypatch.context() as m:
            reads.record(m)
            assert cli.main([name]) == 0, name
        assert reads.keys, name
        undeclared += [(name, k) for k in sorted(reads.keys)
                       if not covered(k, stage.params) and (name, k) not in NOT_OUTPUTS
                       and not any(k.startswith(x) for x in OPERATIONAL)]
        unread += [(name, p) for p in stage.params if (name, p) not in CONDITIONAL
                   and not any(covered(k, (p,)) for k in reads.keys)]
    assert not undeclared, f"(stage, key) read but not among the stage's params: {undeclared}"
    assert not unread, f"(stage, param) declared but never read: {unread}"


def test_the_recorder_sees_reads_and_only_of_the_loaded_config(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "params.yaml").write_text("reranker:\n  max_windows: 3\n")
    reads = Reads()
    reads.record(monkeypatch)
    cfg = cli.load_config(tmp_path / "params.yaml", {})
    assert not reads.keys  # loading validates every field: not counted
    assert cfg.reranker.max_windows == 3 and cfg.seed == 0
    dataclasses.replace(cfg.index, kind="flat").window_words  # a copy's fields: not counted
    assert reads.keys == {"reranker.max_windows", "seed"} | {  # replace reads the others
        f"index.{f.name}" for f in dataclasses.fields(config.IndexConfig) if f.name != "kind"}
