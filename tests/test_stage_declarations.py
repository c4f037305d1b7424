"""Each stage's DVC params, data deps and code deps are exactly what it reads and runs: a key,
file or module it uses but does not declare would leave its outputs stale when that changes under
`dvc repro`; a param or data dep it declares but never reads reruns it for nothing (e.g. a
15-minute reranker training for an inference-only setting). The stages run by the CLI on two tiny
projects (one with every optional part on: reranker, distillation, abstention, joint training,
MLflow tracking and the registry; one for the other branches) while the loaded config records
each field read, an audit hook each project file opened for reading, and a trace hook each
package file whose functions the stage's function calls."""

from __future__ import annotations

import dataclasses
import os
import sys
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from ragtrain import cli, config
from ragtrain.pipeline import tracked
from ragtrain.pipeline.code import PACKAGE_DIR, repo_path
from ragtrain.pipeline.stages import STAGES
from tests.conftest import FIXTURES, TINY_RAG_PARAMS
from tests.test_joint import JOINT_PARAMS
from tests.test_reranker import RERANKER_SECTION

# Read without changing what a stage writes: MLflow logging, how long a download may take, how
# an index is searched (the same results on the CPU or a GPU, memory-mapped or not; `package`
# does declare these: the bundle's manifest records them).
OPERATIONAL = ("tracking.", "data.download_timeout_s", "index.device", "index.mmap")
NOT_OUTPUTS = {("evaluate", "retriever.kind")}  # the printed summary's label only
# Run inside a stage's function without being its code: the MLflow run's per-step logging (the
# on_step callback run_stage hands the trainers, and the run handle it calls).
LOGGING_CODE = ("src/ragtrain/pipeline/stages.py", "src/ragtrain/tracking/runs.py",
                "src/ragtrain/tracking/store.py")
PACKAGE_PREFIX = str(PACKAGE_DIR) + os.sep
# Read by every stage, not data: the params (by key, above), the wall-time record, checkpoints.
BOOKKEEPING = ("params.yaml", "timings", "checkpoints")


class Reads:
    """Within ``record(monkeypatch)``, the dotted keys of the loaded config's fields read (not
    while loading it: its own validation reads them all; not of copies made later)."""

    def __init__(self) -> None:
        self.keys: set[str] = set()
        self.where: dict[int, str] = {}  # id of the loaded config and its sections -> place
        self.paused = False

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
                place = None if self.paused else self.where.get(id(obj))
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
        as_dict = tracked.to_dict

        def logged(cfg: object) -> object:  # the MLflow run's record of every param
            self.paused = True
            try:
                return as_dict(cfg)
            finally:
                self.paused = False

        monkeypatch.setattr(tracked, "to_dict", logged)


def covered(key: str, params: tuple[str, ...], sep: str = ".") -> bool:
    """``key`` is one of ``params`` or inside one (a section; with sep "/", a folder)."""
    return any(key == p or key.startswith(p + sep) for p in params)


EVERYTHING = TINY_RAG_PARAMS.replace("retriever:\n", "retriever:\n  loss: distill\n"
                                     "  hard_negatives_per_query: 2\n", 1) + JOINT_PARAMS \
    + RERANKER_SECTION.replace("{enabled}", "true") + "abstention:\n  enabled: true\n"


class Opened:
    """Within ``with Opened(root)``, the files under ``root`` opened for reading from Python (an
    audit hook on ``open`` events; hooks cannot be removed: one per process, idle outside)."""

    current: Opened | None = None
    hooked = False

    def __init__(self, root: Path) -> None:
        self.root, self.files = root.resolve(), set()

    @classmethod
    def hook(cls, event: str, args: tuple) -> None:
        me = cls.current
        if me is None or event != "open" or not isinstance(args[0], (str, Path)):
            return
        mode, flags = args[1], args[2]
        writes = (any(c in mode for c in "wax+") if isinstance(mode, str)
                  else bool(flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT)))
        path = Path(os.path.abspath(args[0]))
        if (writes or not path.is_relative_to(me.root) or not path.is_file()
                or any(p.startswith(".") and p.endswith(".tmp") for p in path.parts)):
            return  # (a directory opened to fsync it; a file being written atomically)
        me.files.add(path.relative_to(me.root).as_posix())

    def __enter__(self) -> Opened:
        if not Opened.hooked:
            sys.addaudithook(Opened.hook)
            Opened.hooked = True
        Opened.current = self
        return self

    def __exit__(self, *exc: object) -> None:
        Opened.current = None


# The other branches: chunked documents, dense retrieval, an HNSW index of whole passages,
# RAG-Token joint training, the reranker and abstention off.
OTHERWISE = TINY_RAG_PARAMS.replace("data:\n", "data:\n  chunk_tokens: 8\n  chunk_overlap: 2\n", 1
                                    ).replace("retriever:\n", "retriever:\n  kind: dense\n", 1) \
    + JOINT_PARAMS + "  marginal: token\nindex:\n  kind: hnsw\n  window_words: 0\n"


class Ran:
    """The package files (``src/ragtrain/...``) with a Python function called while ``fn``
    runs, in any thread (a trace hook on call events; nothing is traced line by line)."""

    def __init__(self) -> None:
        self.files: set[str] = set()

    def wrap(self, fn: Callable[..., Any]) -> Callable[..., Any]:
        def hook(frame: Any, event: str, arg: Any) -> None:
            f = frame.f_code.co_filename
            if f.startswith(PACKAGE_PREFIX):
                self.files.add(repo_path(Path(f)))

        def traced(*args: Any, **kwargs: Any) -> Any:
            sys.settrace(hook)
            threading.settrace(hook)
            try:
                return fn(*args, **kwargs)
            finally:
                sys.settrace(None)
                threading.settrace(None)  # type: ignore[arg-type]

        return traced


@pytest.fixture(scope="module")
def recorded(tmp_path_factory: pytest.TempPathFactory, tiny_bert_dir: Path
             ) -> dict[str, tuple[set[str], set[str], set[str]]]:
    """Per stage (DAG order), run by the CLI on two tiny projects (EVERYTHING, OTHERWISE): the
    config keys it read, the project files it opened for reading and the package files its
    function ran, in either."""
    out: dict[str, tuple[set[str], set[str], set[str]]] = {
        name: (set(), set(), set()) for name in STAGES}
    for project, text in (("everything", EVERYTHING), ("otherwise", OTHERWISE)):
        root = tmp_path_factory.mktemp(project)
        (root / "params.yaml").write_text(text.format(
            source=FIXTURES / "tiny_jsonl", bert=tiny_bert_dir, tracked="true",
            uri="sqlite:///mlruns/mlflow.db"))
        with pytest.MonkeyPatch.context() as m:
            m.chdir(root)
            for name, stage in STAGES.items():
                reads, ran = Reads(), Ran()
                with m.context() as mm, Opened(root) as opened:
                    reads.record(mm)
                    mm.setitem(STAGES, name, dataclasses.replace(stage, fn=ran.wrap(stage.fn)))
                    assert cli.main([name]) == 0, (project, name)
                out[name][0].update(reads.keys)
                out[name][1].update(opened.files)
                out[name][2].update(ran.files)
    return out


def test_each_stage_declares_exactly_the_params_it_reads(
        recorded: dict[str, tuple[set[str], set[str], set[str]]]) -> None:
    undeclared, unread = [], []
    for name, (keys, _, _) in recorded.items():
        params = STAGES[name].params
        assert keys, name
        undeclared += [(name, k) for k in sorted(keys)
                       if not covered(k, params) and (name, k) not in NOT_OUTPUTS
                       and not any(k.startswith(x) for x in OPERATIONAL)]
        unread += [(name, p) for p in params if not any(covered(k, (p,)) for k in keys)]
    assert not undeclared + unread, (f"(stage, key) read but not among the stage's params: "
                                     f"{undeclared}; (stage, param) never read: {unread}")


def test_each_stage_declares_the_files_it_reads(
        recorded: dict[str, tuple[set[str], set[str], set[str]]]) -> None:
    undeclared, unread = [], []
    for name, (_, files, _) in recorded.items():
        st = STAGES[name]
        deps = [d for d in st.deps if not d.startswith("src/")]
        own = (*st.outs, *st.metrics, *(p.path for p in st.plots))
        undeclared += [(name, f) for f in sorted(files)
                       if not covered(f, (*deps, *own, *BOOKKEEPING), "/")]
        unread += [(name, d) for d in deps if not any(covered(f, (d,), "/") for f in files)]
    assert not undeclared + unread, (f"(stage, file) read but not among the stage's deps: "
                                     f"{undeclared}; (stage, dep) never read: {unread}")


def test_each_stage_runs_only_the_code_of_its_deps(
        recorded: dict[str, tuple[set[str], set[str], set[str]]]) -> None:
    """The code deps come from a static import closure (pipeline/code.py); here, what ran."""
    missing = {name: sorted(ran - set(STAGES[name].code()) - set(LOGGING_CODE))
               for name, (_, _, ran) in recorded.items()}
    assert all(recorded[n][2] for n in STAGES)  # the hook saw each stage's function run
    assert not any(missing.values()), f"ran, but not among the stage's code deps: {missing}"


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
