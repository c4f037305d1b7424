"""MLflow at the edge: store checks, runs, lineage, promotion rule, registry aliases and plots.

The only module that imports mlflow, and it does so inside functions, so ``import
ragtrain.tracking`` stays cheap. Everything goes through an ``MlflowClient`` bound to the
configured URI: nothing here touches MLflow's global tracking URI or active-run state.
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import logging
import math
import numbers
import os
import platform
import posixpath
import re
import sqlite3
import subprocess
import time
import warnings
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlparse

from ragtrain.errors import TrackingError
from ragtrain.io import atomic_path

if TYPE_CHECKING:
    from mlflow.tracking import MlflowClient

    from ragtrain.config import TrackingConfig

log = logging.getLogger(__name__)

# MLflow's portable name check (mlflow.utils.validation; POSIX also allows ':', Windows doesn't).
_NAME_RE = re.compile(r"^[/\w.\- ]*$")
_MAX_KEY_LEN = 250  # MAX_ENTITY_KEY_LENGTH
_MAX_PARAM_LEN = 6000  # MAX_PARAM_VAL_LENGTH
_MAX_TAG_LEN = 8000  # MAX_TAG_VAL_LENGTH
_MAX_PARAMS_PER_BATCH = 100  # MAX_PARAMS_TAGS_PER_BATCH
_MAX_METRICS_PER_BATCH = 1000
_MAX_DIGEST_LEN = 36  # MAX_DATASET_DIGEST_SIZE: a sha256 does not fit, an md5 (+ ".dir") does
_SQLITE_PREFIX = "sqlite:///"
_FIX_HINT = "use tracking.uri: sqlite:///mlruns/mlflow.db"
PARENT_RUN_TAG = "mlflow.parentRunId"
DATASET_CONTEXT_TAG = "mlflow.data.context"


# --------------------------------------------------------------------------- store


def _split_sqlite(uri: str) -> tuple[str, str] | None:
    """``sqlite:///path?query`` -> (path, "?query"); None for other URIs."""
    if not uri.startswith(_SQLITE_PREFIX):
        return None
    rest = uri[len(_SQLITE_PREFIX):]
    path, sep, query = rest.partition("?")
    return path, sep + query


def resolve_uri(uri: str, root: Path = Path(".")) -> str:
    """Return ``uri`` with a relative sqlite path made absolute against ``root``."""
    parts = _split_sqlite(uri)
    if parts is None or parts[0] in ("", ":memory:"):
        return uri
    path, query = parts
    p = Path(path)
    if not p.is_absolute():
        p = Path(root) / p
    return f"{_SQLITE_PREFIX}{p.resolve()}{query}"  # absolute: sqlite:////abs/path


def sqlite_path(uri: str, root: Path = Path(".")) -> Path | None:
    """The database file of a sqlite URI (absolute), or None for other stores."""
    parts = _split_sqlite(resolve_uri(uri, root))
    if parts is None or parts[0] in ("", ":memory:"):
        return None
    return Path(parts[0])


def artifact_root(uri: str, root: Path = Path(".")) -> Path | None:
    """Where a sqlite store keeps run artifacts: ``<db folder>/artifacts``; None otherwise."""
    db = sqlite_path(uri, root)
    return None if db is None else db.parent / "artifacts"


def _check_http(uri: str, timeout_s: float) -> None:
    import urllib.error
    import urllib.request

    url = uri.rstrip("/") + "/health"
    try:
        with urllib.request.urlopen(url, timeout=timeout_s) as resp:
            if resp.status != 200:
                raise urllib.error.HTTPError(url, resp.status, resp.reason, resp.headers, None)
    except urllib.error.HTTPError as e:
        reason = f"GET {url} returned HTTP {e.code}"
    except urllib.error.URLError as e:
        reason = str(e.reason)
    except (TimeoutError, OSError, ValueError) as e:  # ValueError: malformed URL
        reason = str(e) or type(e).__name__
    else:
        return
    raise TrackingError(
        f"tracking.uri: cannot reach the MLflow server at {uri}: {reason}; "
        "start it with `make mlflow-ui` or fix tracking.uri"
    )


def _check_sqlite(uri: str, root: Path) -> None:
    path, _ = _split_sqlite(uri) or ("", "")
    if path in ("", ":memory:"):
        raise TrackingError(
            f"tracking.uri: {uri!r} is an in-memory database that keeps nothing; {_FIX_HINT}"
        )
    db = sqlite_path(uri, root)
    assert db is not None
    if db.exists():
        if not db.is_file():
            raise TrackingError(f"tracking.uri: {db} is not a file (a folder?); {_FIX_HINT}")
        try:
            con = sqlite3.connect(f"{db.as_uri()}?mode=ro", uri=True, timeout=5)
            try:
                con.execute("PRAGMA schema_version").fetchone()
            finally:
                con.close()
        except sqlite3.Error as e:
            raise TrackingError(
                f"tracking.uri: {db} is not a readable sqlite database ({e}); "
                "move it away or point tracking.uri at another file"
            ) from None
        if not os.access(db, os.W_OK):
            raise TrackingError(f"tracking.uri: {db} is read-only; MLflow needs to write to it")
        return
    # The file will be created: the nearest existing ancestor must be a writable folder.
    parent = db.parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir():
        raise TrackingError(
            f"tracking.uri: cannot create {db}: {parent} exists and is not a folder"
        )
    if not os.access(parent, os.W_OK | os.X_OK):
        raise TrackingError(f"tracking.uri: cannot create {db}: {parent} is not writable")


def check_store(uri: str, timeout_s: float = 5.0, *, root: Path = Path(".")) -> None:
    """Raise TrackingError when the store at ``uri`` cannot be used; cheap, no mlflow import.

    http(s): GET ``<uri>/health``. sqlite: the file is a readable sqlite database, or can be
    created (relative paths resolve against ``root``). File stores are refused: MLflow 3.13+
    refuses them too. Other schemes (postgresql, mysql, databricks, ...) are not checked.
    """
    if not uri or not uri.strip():
        raise TrackingError(f"tracking.uri: empty; {_FIX_HINT}")
    scheme = urlparse(uri).scheme.lower()
    if scheme in ("http", "https"):
        _check_http(uri, timeout_s)
    elif scheme == "sqlite":
        if not uri.startswith(_SQLITE_PREFIX):
            raise TrackingError(
                f"tracking.uri: {uri!r}: write sqlite URIs with three slashes, "
                "e.g. sqlite:///mlruns/mlflow.db (relative) or sqlite:////abs/path/mlflow.db"
            )
        _check_sqlite(uri, root)
    elif scheme in ("", "file"):
        raise TrackingError(
            f"tracking.uri: {uri!r} is an MLflow file store, which MLflow 3.13+ refuses "
            f"(maintenance mode); {_FIX_HINT}"
        )


def client(uri: str, root: Path = Path(".")) -> MlflowClient:
    """An MlflowClient for tracking and registry at ``uri`` (relative sqlite paths -> ``root``)."""
    from mlflow.tracking import MlflowClient

    resolved = resolve_uri(uri, root)
    db = sqlite_path(resolved)
    if db is not None:
        db.parent.mkdir(parents=True, exist_ok=True)
    return MlflowClient(tracking_uri=resolved, registry_uri=resolved)


@contextlib.contextmanager
def _mlflow_errors(what: str) -> Iterator[None]:
    """Turn MlflowException into a one-line TrackingError that says what was being done."""
    from mlflow.exceptions import MlflowException

    try:
        yield
    except MlflowException as e:
        raise TrackingError(f"{what}: {e.message}") from e


# --------------------------------------------------------------------------- names and values


def check_name(key: str, kind: str = "metric") -> str:
    """Return ``key`` if MLflow accepts it as a metric/param/tag name, else raise TrackingError."""
    problem = None
    if not isinstance(key, str) or not key:
        problem = "names must be non-empty strings"
    elif not _NAME_RE.match(key):
        problem = "names may contain only letters, digits, '_', '-', '.', '/' and spaces"
        if "@" in key:
            problem += f" (write {key.replace('@', '_at_')!r}, not {key!r})"
    elif len(key) > _MAX_KEY_LEN:
        problem = f"names are at most {_MAX_KEY_LEN} characters"
    else:
        norm = posixpath.normpath(key)
        if norm != key or norm == "." or norm.startswith("..") or norm.startswith("/"):
            problem = f"names must be normalised paths (this one reads as {norm!r})"
    if problem:
        raise TrackingError(f"{kind} name {key!r} is not valid for MLflow: {problem}")
    return key


def _truncate(value: Any, limit: int, key: str, kind: str) -> str:
    s = str(value)
    if len(s) > limit:
        log.warning("%s %r: value of %d characters truncated to %d", kind, key, len(s), limit)
        s = s[:limit]
    return s


def _chunks(items: Sequence[Any], n: int) -> Iterator[Sequence[Any]]:
    for i in range(0, len(items), n):
        yield items[i : i + n]


# --------------------------------------------------------------------------- runs


@dataclass(frozen=True)
class RunHandle:
    """An MLflow run in progress; every method logs to it by id through the bound client."""

    run_id: str
    experiment_id: str
    artifact_uri: str
    tracking_uri: str
    _client: Any = field(repr=False, compare=False)

    def _log_batch(self, kind: str, items: list[Any], per_batch: int) -> None:
        """Send params / metrics / tags to MLflow in batches of its size limit."""
        with _mlflow_errors(f"run {self.run_id}: log {kind}"):
            for chunk in _chunks(items, per_batch):
                self._client.log_batch(self.run_id, **{kind: chunk})

    def log_params(self, flat: Mapping[str, Any]) -> None:
        """Log flat params: values stringified and truncated to MLflow's 6,000 characters."""
        from mlflow.entities import Param

        self._log_batch("params", [
            Param(check_name(str(k), "param"), _truncate(v, _MAX_PARAM_LEN, str(k), "param"))
            for k, v in flat.items()
        ], _MAX_PARAMS_PER_BATCH)

    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        """Log metrics at ``step``; a bad name raises (naming it); NaN is skipped with a warning."""
        from mlflow.entities import Metric

        ts = int(time.time() * 1000)
        out = []
        for k, v in metrics.items():
            check_name(k, "metric")
            if not isinstance(v, numbers.Real) or isinstance(v, bool):
                raise TrackingError(f"metric {k!r}: expected a number, got {v!r}")
            value = float(v)
            if math.isnan(value):
                log.warning("metric %r is NaN; not logged (step %s)", k, step)
                continue
            out.append(Metric(k, value, ts, int(step or 0)))
        self._log_batch("metrics", out, _MAX_METRICS_PER_BATCH)

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        """Set tags: values stringified and truncated to MLflow's 8,000 characters."""
        from mlflow.entities import RunTag

        self._log_batch("tags", [
            RunTag(check_name(str(k), "tag"), _truncate(v, _MAX_TAG_LEN, str(k), "tag"))
            for k, v in tags.items()
        ], _MAX_PARAMS_PER_BATCH)

    def log_artifact(self, path: Path, artifact_path: str | None = None) -> None:
        """Copy a file, or a folder's contents, to the run (a folder lands under its own name)."""
        path = Path(path)
        if not path.exists():
            raise TrackingError(f"run {self.run_id}: cannot log artifact {path}: no such file")
        with _mlflow_errors(f"run {self.run_id}: log_artifact {path}"):
            if path.is_dir():
                dest = artifact_path if artifact_path is not None else path.name
                self._client.log_artifacts(self.run_id, str(path), dest)
            else:
                self._client.log_artifact(self.run_id, str(path), artifact_path)

    def log_dict(self, d: Mapping[str, Any] | list[Any], file_name: str) -> None:
        """Write ``d`` as a JSON (or .yaml/.yml) artifact named ``file_name``."""
        data = dict(d) if isinstance(d, Mapping) else list(d)
        with _mlflow_errors(f"run {self.run_id}: log_dict {file_name}"):
            self._client.log_dict(self.run_id, data, file_name)

    def log_input_dataset(self, name: str, path: Path, digest: str, context: str) -> None:
        """Record a local dataset (by path and digest) as a run input used in ``context``.

        MLflow keeps at most 36 characters of digest (an md5 fits, a sha256 does not): a longer
        digest is stored as its prefix, with the full value in the input tag ``ragtrain.digest``.
        """
        from mlflow.data.dataset_source_registry import resolve_dataset_source
        from mlflow.data.filesystem_dataset_source import FileSystemDatasetSource
        from mlflow.data.meta_dataset import MetaDataset
        from mlflow.entities import DatasetInput, InputTag

        if not digest:
            raise TrackingError(f"dataset {name!r}: empty digest")
        with warnings.catch_warnings():
            # MLflow registers the same LocalArtifactDatasetSource for "" and "file:" and warns
            # that the URI "can be interpreted in multiple ways"; both are the same class.
            warnings.filterwarnings("ignore", message=".*interpreted in multiple ways")
            source = resolve_dataset_source(
                Path(path).resolve().as_uri(), candidate_sources=[FileSystemDatasetSource]
            )
        ds = MetaDataset(source, name=name, digest=digest[:_MAX_DIGEST_LEN])
        tags = [InputTag(DATASET_CONTEXT_TAG, context)]
        if len(digest) > _MAX_DIGEST_LEN:
            tags.append(InputTag("ragtrain.digest", digest))
        with _mlflow_errors(f"run {self.run_id}: log_input_dataset {name}"):
            self._client.log_inputs(
                self.run_id, datasets=[DatasetInput(ds._to_mlflow_entity(), tags)]
            )


def _experiment_id(mc: MlflowClient, name: str, uri: str) -> str:
    from mlflow.exceptions import MlflowException

    exp = mc.get_experiment_by_name(name)
    if exp is None:
        art = artifact_root(uri)
        location = art.as_uri() if art is not None else None
        try:
            return mc.create_experiment(name, artifact_location=location)
        except MlflowException:
            exp = mc.get_experiment_by_name(name)  # created concurrently by another process
            if exp is None:
                raise
    if exp.lifecycle_stage == "deleted":
        raise TrackingError(
            f"tracking.experiment: {name!r} is deleted in {uri}; restore it "
            f"(`mlflow experiments restore --experiment-id {exp.experiment_id}`) "
            "or choose another name"
        )
    return exp.experiment_id


def _terminate(mc: MlflowClient, run_id: str, status: str) -> None:
    try:
        mc.set_terminated(run_id, status)
    except Exception as e:  # never hide the exception that ended the run
        log.warning("could not mark run %s %s: %s", run_id, status, e)


@contextlib.contextmanager
def run(
    cfg: TrackingConfig,
    name: str,
    *,
    root: Path = Path("."),
    parent_run_id: str | None = None,
    tags: Mapping[str, str] | None = None,
) -> Iterator[RunHandle]:
    """Yield a RunHandle for a new run; it ends FINISHED, FAILED (exception) or KILLED (Ctrl-C).

    The store is checked first (TrackingError before any work). With a sqlite store the
    experiment is created with its artifacts under ``<db folder>/artifacts``.
    """
    import getpass
    import sys

    check_store(cfg.uri, root=root)
    uri = resolve_uri(cfg.uri, root)
    mc = client(uri)
    run_tags: dict[str, str] = {"mlflow.source.type": "LOCAL"}
    with contextlib.suppress(Exception):
        run_tags["mlflow.user"] = getpass.getuser()
    if sys.argv and sys.argv[0]:
        run_tags["mlflow.source.name"] = Path(sys.argv[0]).name
    for k, v in (tags or {}).items():
        run_tags[check_name(str(k), "tag")] = _truncate(v, _MAX_TAG_LEN, str(k), "tag")
    with _mlflow_errors(f"tracking ({uri}, experiment {cfg.experiment!r})"):
        exp_id = _experiment_id(mc, cfg.experiment, uri)
        if parent_run_id is not None:
            from mlflow.exceptions import MlflowException

            try:
                mc.get_run(parent_run_id)
            except MlflowException:
                raise TrackingError(
                    f"parent run {parent_run_id!r} does not exist in {uri}"
                ) from None
            run_tags[PARENT_RUN_TAG] = parent_run_id
        created = mc.create_run(exp_id, tags=run_tags, run_name=name)
    info = created.info
    handle = RunHandle(info.run_id, info.experiment_id, info.artifact_uri, uri, mc)
    try:
        yield handle
    except KeyboardInterrupt:
        _terminate(mc, info.run_id, "KILLED")
        raise
    except BaseException:
        _terminate(mc, info.run_id, "FAILED")
        raise
    with _mlflow_errors(f"run {info.run_id}: end"):
        mc.set_terminated(info.run_id, "FINISHED")


# --------------------------------------------------------------------------- lineage


def _git(root: Path, *args: str) -> str | None:
    try:
        r = subprocess.run(
            ["git", "-C", str(root), *args], capture_output=True, text=True, timeout=30
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    return r.stdout if r.returncode == 0 else None


def _version(*dists: str) -> str:
    for d in dists:
        try:
            v = importlib.metadata.version(d)
        except importlib.metadata.PackageNotFoundError:
            continue
        return v if d == dists[0] else f"{v} ({d})"
    return "absent"


def _key_part(text: str) -> str:
    # dvc.lock stage names of foreach/matrix stages contain '@' ("evaluate@dev"): MLflow refuses it.
    return re.sub(r"[^/\w.\- ]", "_", text)


def _dvc_hashes(lock: Path) -> dict[str, str]:
    from ruamel.yaml import YAML, YAMLError

    try:
        doc = YAML(typ="safe", pure=True).load(lock.read_text(encoding="utf-8")) or {}
    except (OSError, UnicodeDecodeError, YAMLError) as e:
        return {"dvc.lock": f"unreadable: {type(e).__name__}"}
    stages = doc.get("stages") if isinstance(doc, Mapping) else None
    if not isinstance(stages, Mapping):
        return {"dvc.lock": "unreadable: no stages"}
    out: dict[str, str] = {}
    for stage, body in stages.items():
        if not isinstance(body, Mapping):
            continue
        for section in ("deps", "outs"):
            for entry in body.get(section) or []:
                if not isinstance(entry, Mapping) or "path" not in entry:
                    continue
                digest = next(
                    (entry[h] for h in ("md5", "checksum", "etag") if entry.get(h)), None
                )
                if digest is not None:
                    out[f"dvc.{_key_part(str(stage))}.{_key_part(str(entry['path']))}"] = str(
                        digest
                    )
    return out


def lineage(root: Path) -> dict[str, str]:
    """What produced a run: git commit and dirty flag, dvc.lock hashes, library versions.

    Keys: ``git.commit``, ``git.dirty`` ("true"/"false"; both "unknown" outside a git repo),
    ``dvc.<stage>.<path>`` (md5 of every dep and out in dvc.lock; characters MLflow refuses in
    a name become '_'), ``version.<python|torch|transformers|mlflow|dvc|faiss>`` ("absent").
    """
    root = Path(root)
    commit = _git(root, "rev-parse", "HEAD")
    status = _git(root, "status", "--porcelain")
    out = {
        "git.commit": commit.strip() if commit else "unknown",
        "git.dirty": "unknown" if status is None else str(bool(status.strip())).lower(),
    }
    lock = root / "dvc.lock"
    if lock.is_file():
        out.update(_dvc_hashes(lock))
    out["version.python"] = platform.python_version()
    for key, dists in {
        "torch": ("torch",),
        "transformers": ("transformers",),
        "mlflow": ("mlflow",),
        "dvc": ("dvc",),
        "faiss": ("faiss-cpu", "faiss-gpu", "faiss-gpu-cu12", "faiss"),
    }.items():
        out[f"version.{key}"] = _version(*dists)
    return out


# --------------------------------------------------------------------------- promotion


@dataclass(frozen=True)
class Decision:
    """Whether to promote a model, and a sentence that says why, with both values."""

    promote: bool
    reason: str


def should_promote(
    new: Mapping[str, float],
    current: Mapping[str, float] | None,
    *,
    metric: str,
    min_gain: float = 0.0,
    greater_is_better: bool = True,
    floor: float | None = None,
) -> Decision:
    """Promote ``new`` over the champion ``current`` only on a gain strictly above ``min_gain``.

    No champion: promote if ``new`` meets ``floor`` (or no floor). The floor also applies when
    there is a champion, so a model below it is never promoted. Missing or NaN values refuse.
    """
    if not (math.isfinite(min_gain) and min_gain >= 0):
        raise ValueError(f"min_gain: must be a finite number >= 0, got {min_gain!r}")
    direction = "higher" if greater_is_better else "lower"
    nv = new.get(metric)
    if nv is None or math.isnan(nv):
        return Decision(False, f"refused: the new model has no {metric} value; cannot judge it")
    if floor is not None:
        below = nv < floor if greater_is_better else nv > floor
        if below:
            return Decision(
                False,
                f"refused: new {metric} = {nv:.6g} does not meet the floor {floor:.6g} "
                f"({direction} is better)",
            )
    if current is None:
        meets = "" if floor is None else f", which meets the floor {floor:.6g}"
        return Decision(
            True, f"promoted: no current champion; new {metric} = {nv:.6g}{meets}"
        )
    cv = current.get(metric)
    if cv is None or math.isnan(cv):
        return Decision(
            False,
            f"refused: the current champion has no {metric} value (new = {nv:.6g}); "
            "cannot compare",
        )
    gain = (nv - cv) if greater_is_better else (cv - nv)
    detail = (
        f"new {metric} = {nv:.6g} vs champion {cv:.6g} ({direction} is better): "
        f"gain {gain:+.6g}, needs > {min_gain:.6g}"
    )
    if gain > min_gain:
        return Decision(True, f"promoted: {detail}")
    return Decision(False, f"refused: {detail}")


# --------------------------------------------------------------------------- registry


def register_model(
    cfg: TrackingConfig,
    run_id: str,
    artifact_path: str,
    name: str,
    tags: Mapping[str, str] | None = None,
    *,
    root: Path = Path("."),
) -> str:
    """Register the run's artifact folder ``artifact_path`` as a new version of ``name``."""
    from mlflow.exceptions import MlflowException

    mc = client(cfg.uri, root)
    with _mlflow_errors(f"register {name!r} from run {run_id}"):
        r = mc.get_run(run_id)
        if not mc.list_artifacts(run_id, artifact_path):
            raise TrackingError(
                f"register {name!r}: run {run_id} has no artifacts under {artifact_path!r}"
            )
        try:
            mc.create_registered_model(name)
        except MlflowException as e:
            if e.error_code != "RESOURCE_ALREADY_EXISTS":
                raise
        source = f"{r.info.artifact_uri.rstrip('/')}/{artifact_path.strip('/')}"
        mv = mc.create_model_version(
            name, source, run_id=run_id, tags={k: str(v) for k, v in (tags or {}).items()}
        )
    return str(mv.version)


def set_alias(cfg: TrackingConfig, name: str, alias: str, version: str, *,
              root: Path = Path(".")) -> None:
    """Point ``name@alias`` at ``version`` (moving it if it pointed elsewhere)."""
    with _mlflow_errors(f"set alias {name}@{alias} -> {version}"):
        client(cfg.uri, root).set_registered_model_alias(name, alias, str(version))


def get_alias(cfg: TrackingConfig, name: str, alias: str, *,
              root: Path = Path(".")) -> str | None:
    """The version ``name@alias`` points at; None if the model or the alias does not exist."""
    from mlflow.exceptions import MlflowException

    mc = client(cfg.uri, root)
    try:
        rm = mc.get_registered_model(name)
    except MlflowException as e:
        if e.error_code in ("RESOURCE_DOES_NOT_EXIST", "NOT_FOUND"):
            return None
        raise TrackingError(f"get alias {name}@{alias}: {e.message}") from e
    v = (rm.aliases or {}).get(alias)
    return None if v is None else str(v)


def delete_alias(cfg: TrackingConfig, name: str, alias: str, *, root: Path = Path(".")) -> None:
    """Remove ``name@alias``; a no-op when the model or the alias does not exist."""
    if get_alias(cfg, name, alias, root=root) is None:
        return
    with _mlflow_errors(f"delete alias {name}@{alias}"):
        client(cfg.uri, root).delete_registered_model_alias(name, alias)


def tag_version(cfg: TrackingConfig, name: str, version: str, tags: Mapping[str, Any], *,
                root: Path = Path(".")) -> None:
    """Set tags on one model version (values stringified)."""
    mc = client(cfg.uri, root)
    with _mlflow_errors(f"tag {name} version {version}"):
        for k, v in tags.items():
            mc.set_model_version_tag(name, str(version), k, _truncate(v, _MAX_TAG_LEN, k, "tag"))


def version_metrics(cfg: TrackingConfig, name: str, version: str, *,
                    root: Path = Path(".")) -> dict[str, float]:
    """The latest metrics of the run behind ``name`` version ``version`` ({} without a run)."""
    mc = client(cfg.uri, root)
    with _mlflow_errors(f"metrics of {name} version {version}"):
        mv = mc.get_model_version(name, str(version))
        if not mv.run_id:
            return {}
        return dict(mc.get_run(mv.run_id).data.metrics)


def version_tags(cfg: TrackingConfig, name: str, version: str, *,
                 root: Path = Path(".")) -> dict[str, str]:
    """The tags of ``name`` version ``version``."""
    with _mlflow_errors(f"tags of {name} version {version}"):
        return dict(client(cfg.uri, root).get_model_version(name, str(version)).tags)


def delete_version(cfg: TrackingConfig, name: str, version: str, *,
                   root: Path = Path(".")) -> None:
    """Delete one model version, and the registered model if it has no version left."""
    mc = client(cfg.uri, root)
    with _mlflow_errors(f"delete {name} version {version}"):
        mc.delete_model_version(name, str(version))
        if not mc.search_model_versions(f"name = '{name}'"):
            mc.delete_registered_model(name)


def download_version(cfg: TrackingConfig, name: str, version: str, dst: Path, *,
                     root: Path = Path(".")) -> Path:
    """Download the artifacts of ``name`` version ``version`` into ``dst``; returns the folder."""
    from mlflow.artifacts import download_artifacts

    mc = client(cfg.uri, root)
    with _mlflow_errors(f"download {name} version {version}"):
        source = mc.get_model_version_download_uri(name, str(version))
        Path(dst).mkdir(parents=True, exist_ok=True)
        return Path(download_artifacts(artifact_uri=source, dst_path=str(dst),
                                       tracking_uri=resolve_uri(cfg.uri, root)))


def load_rag_model(cfg: TrackingConfig, name: str, alias: str, dst: Path, *,
                   root: Path = Path(".")) -> tuple[str, Any]:
    """(version, the RAG model) of ``name@alias``, downloaded to ``dst`` and loaded the way
    serving loads it (``mlflow.pyfunc.load_model`` -> ``RAGPyfunc.load_context``)."""
    import mlflow.pyfunc

    version = get_alias(cfg, name, alias, root=root)
    if version is None:
        raise TrackingError(f"no model {name}@{alias} in {cfg.uri}")
    local = download_version(cfg, name, version, dst, root=root)
    with _mlflow_errors(f"load {name} version {version}"):
        return version, mlflow.pyfunc.load_model(str(local)).unwrap_python_model().model


def log_rag_model(run: RunHandle, bundle: Path, example_questions: Sequence[str],
                  artifact_path: str = "rag", *, rag_class: str | None = None) -> str:
    """Log the RAG bundle as an MLflow pyfunc model folder under ``artifact_path`` of ``run``.

    Saved locally first (from code: no pickle; explicit signature, pinned requirements, so the
    model is not loaded), then copied to the run; register it with ``register_model``.
    """
    import tempfile

    from ragtrain.tracking import pyfunc as tracking_pyfunc

    kwargs = {"rag_class": rag_class} if rag_class else {}
    with tempfile.TemporaryDirectory() as tmp, _mlflow_errors(f"log RAG model {bundle}"):
        out = tracking_pyfunc.save_rag_pyfunc(bundle, Path(tmp) / "model", example_questions,
                                              **kwargs)
        run.log_artifact(out, artifact_path)
    return artifact_path


# --------------------------------------------------------------------------- plots


def _save(fig: Any, path: Path) -> Path:
    path = Path(path)
    fmt = path.suffix.lstrip(".").lower() or "png"
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format=fmt, dpi=120, bbox_inches="tight")
    return path


def _finite(v: Any) -> bool:
    return isinstance(v, numbers.Real) and not isinstance(v, bool) and math.isfinite(v)


def plot_curve(points: list[dict[str, Any]], x: str, ys: list[str], path: Path,
               title: str) -> Path:
    """Plot each of ``ys`` against ``x`` (one panel each, shared x) from logged points; a PNG."""
    from matplotlib.figure import Figure  # no pyplot: no global backend state (Agg for files)

    if not ys:
        raise TrackingError(f"plot_curve {path}: no y keys given")
    fig = Figure(figsize=(7, 2.6 * len(ys)))
    axes = fig.subplots(len(ys), 1, sharex=True, squeeze=False)[:, 0]
    plotted = 0
    for ax, y in zip(axes, ys, strict=True):
        xy = [(p[x], p[y]) for p in points if _finite(p.get(x)) and _finite(p.get(y))]
        if xy:
            xs, vs = zip(*xy, strict=True)
            ax.plot(xs, vs, linewidth=1.2)
            plotted += 1
        else:
            ax.text(0.5, 0.5, f"no {y} values", ha="center", va="center",
                    transform=ax.transAxes)
        ax.set_ylabel(y)
        ax.grid(True, alpha=0.3)
    if not plotted:
        raise TrackingError(
            f"plot_curve {path}: no point has numeric {x!r} and any of {ys} "
            f"({len(points)} points)"
        )
    axes[-1].set_xlabel(x)
    fig.suptitle(title)
    return _save(fig, path)


def plot_recall_at_k(metrics: Mapping[str, float], split: str, path: Path,
                     systems: list[str]) -> Path:
    """Plot recall@k against k for each system, from keys ``{split}/{system}/recall_at_{k}``."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6, 4))
    ax = fig.subplots()
    all_ks: set[int] = set()
    for system in systems:
        pat = re.compile(rf"^{re.escape(split)}/{re.escape(system)}/recall_at_(\d+)$")
        pts = sorted(
            (int(m.group(1)), float(v))
            for k, v in metrics.items()
            if (m := pat.match(k)) and _finite(v)
        )
        if not pts:
            raise TrackingError(
                f"plot_recall_at_k {path}: no metric like {split}/{system}/recall_at_<k>"
            )
        ks, vs = zip(*pts, strict=True)
        all_ks.update(ks)
        ax.plot(ks, vs, marker="o", label=system)
    ax.set_xscale("log")
    ax.set_xticks(sorted(all_ks), [str(k) for k in sorted(all_ks)])
    ax.minorticks_off()
    ax.set_ylim(0, 1.02)
    ax.set_xlabel("k")
    ax.set_ylabel(f"{split} recall@k")
    ax.set_title(f"Recall@k on {split}")
    ax.grid(True, alpha=0.3)
    ax.legend()
    return _save(fig, path)
