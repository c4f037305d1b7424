"""MLflow runs: a RunHandle that logs by run id, ``run()`` to open one, MLflow's name rules, and
the redaction of secrets from everything a run records."""

from __future__ import annotations

import contextlib
import logging
import math
import numbers
import os
import posixpath
import re
import time
import warnings
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ragtrain.errors import TrackingError
from ragtrain.tracking.store import artifact_root, check_store, client, mlflow_errors, resolve_uri

if TYPE_CHECKING:
    from mlflow.tracking import MlflowClient

    from ragtrain.config import TrackingConfig

log = logging.getLogger(__name__)

# MLflow's portable name check (mlflow.utils.validation; POSIX also allows ':', Windows doesn't).
_NAME_RE = re.compile(r"^[/\w.\- ]*$")
_MAX_KEY_LEN = 250  # MAX_ENTITY_KEY_LENGTH
_MAX_PARAM_LEN = 6000  # MAX_PARAM_VAL_LENGTH
MAX_TAG_LEN = 8000  # MAX_TAG_VAL_LENGTH
_MAX_PARAMS_PER_BATCH = 100  # MAX_PARAMS_TAGS_PER_BATCH
_MAX_METRICS_PER_BATCH = 1000
_MAX_DIGEST_LEN = 36  # MAX_DATASET_DIGEST_SIZE: a sha256 does not fit, an md5 (+ ".dir") does
PARENT_RUN_TAG = "mlflow.parentRunId"
DATASET_CONTEXT_TAG = "mlflow.data.context"


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


# --------------------------------------------------------------------------- secrets

MASK = "***"
# A key (params key, tag, environment variable) that names a secret: a word of it is one of these
# (not "pwd": $PWD is the working folder).
_SECRET_KEY = re.compile(r"(?:^|[._\-/])(?:password|passwd|secret|token|apikey|api[_-]key|"
                         r"access[_-]key|private[_-]key|credentials?|auth[_-]string|"
                         r"connection[_-]string)(?:$|[._\-/])", re.IGNORECASE)
# scheme://user:password@host (the password may hold '@'; the host part ends at '/')
_URL_PASSWORD = re.compile(r"([A-Za-z][\w+.\-]*://[^:/@\s]*):[^/\s]*@")
# scheme://<long token, no colon>@host (a token given as the user name, as git URLs do)
_URL_TOKEN = re.compile(r"([A-Za-z][\w+.\-]*://)[^:/@\s]{16,}@")
_QUERY_SECRET = re.compile(r"([?&;](?:password|passwd|pwd|token|access_token|api_key|apikey|"
                           r"secret|sig|signature|x-amz-signature|x-amz-credential)=)[^&#\s]+",
                           re.IGNORECASE)
_MIN_ENV_SECRET = 6  # shorter values of secret-named variables ("true", "1") are not masked


def is_secret_key(key: str) -> bool:
    """Whether a key names a secret (``MLFLOW_TRACKING_PASSWORD``, ``hf_token``, ``api-key``)."""
    return bool(_SECRET_KEY.search(key))


def secret_env_values(environ: Mapping[str, str] | None = None) -> list[str]:
    """The values of the secret-named environment variables, longest first."""
    env = os.environ if environ is None else environ
    return sorted({v for k, v in env.items() if is_secret_key(k) and len(v) >= _MIN_ENV_SECRET},
                  key=len, reverse=True)


def redact(text: str, environ: Mapping[str, str] | None = None) -> str:
    """``text`` with passwords in URIs, secret query parameters and the values of secret-named
    environment variables replaced by ``***``."""
    for value in secret_env_values(environ):
        text = text.replace(value, MASK)
    text = _URL_PASSWORD.sub(rf"\1:{MASK}@", text)
    text = _URL_TOKEN.sub(rf"\1{MASK}@", text)
    return _QUERY_SECRET.sub(rf"\1{MASK}", text)


def redact_value(key: str, value: Any) -> Any:
    """A value to record under ``key``: masked whole when the key names a secret, strings
    redacted, containers redacted item by item; other values as they are."""
    if is_secret_key(str(key)) and value not in (None, ""):
        return MASK
    if isinstance(value, str):
        return redact(value)
    if isinstance(value, Mapping):
        return {k: redact_value(str(k), v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [redact_value(str(key), v) for v in value]
    return value


# --------------------------------------------------------------------------- names and values


def truncate_value(value: Any, limit: int, key: str, kind: str) -> str:
    """``str(value)``, cut to ``limit`` characters with a warning naming ``key``."""
    s = str(value)
    if len(s) > limit:
        log.warning("%s %r: value of %d characters truncated to %d", kind, key, len(s), limit)
        s = s[:limit]
    return s


def checked_items(items: Mapping[Any, Any], kind: str, limit: int) -> list[tuple[str, str]]:
    """(name, value) pairs MLflow accepts: names checked, secrets redacted, values stringified
    and truncated."""
    return [(check_name(str(k), kind), truncate_value(redact_value(str(k), v), limit, str(k), kind))
            for k, v in items.items()]


def _chunks(items: Sequence[Any], n: int) -> Iterator[Sequence[Any]]:
    for i in range(0, len(items), n):
        yield items[i : i + n]


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
        with mlflow_errors(f"run {self.run_id}: log {kind}"):
            for chunk in _chunks(items, per_batch):
                self._client.log_batch(self.run_id, **{kind: chunk})

    def log_params(self, flat: Mapping[str, Any]) -> None:
        """Log flat params: values stringified and truncated to MLflow's 6,000 characters."""
        from mlflow.entities import Param

        pairs = checked_items(flat, "param", _MAX_PARAM_LEN)
        self._log_batch("params", [Param(k, v) for k, v in pairs], _MAX_PARAMS_PER_BATCH)

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

        pairs = checked_items(tags, "tag", MAX_TAG_LEN)
        self._log_batch("tags", [RunTag(k, v) for k, v in pairs], _MAX_PARAMS_PER_BATCH)

    def log_artifact(self, path: Path, artifact_path: str | None = None) -> None:
        """Copy a file, or a folder's contents, to the run (a folder lands under its own name)."""
        path = Path(path)
        if not path.exists():
            raise TrackingError(f"run {self.run_id}: cannot log artifact {path}: no such file")
        with mlflow_errors(f"run {self.run_id}: log_artifact {path}"):
            if path.is_dir():
                dest = artifact_path if artifact_path is not None else path.name
                self._client.log_artifacts(self.run_id, str(path), dest)
            else:
                self._client.log_artifact(self.run_id, str(path), artifact_path)

    def log_dict(self, d: Mapping[str, Any] | list[Any], file_name: str) -> None:
        """Write ``d`` as a JSON (or .yaml/.yml) artifact named ``file_name``."""
        data = redact_value("", dict(d) if isinstance(d, Mapping) else list(d))
        with mlflow_errors(f"run {self.run_id}: log_dict {file_name}"):
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
        with mlflow_errors(f"run {self.run_id}: log_input_dataset {name}"):
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
            f"tracking.experiment: {name!r} is deleted in {redact(uri)}; restore it "
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
    run_tags.update(checked_items(tags or {}, "tag", MAX_TAG_LEN))
    with mlflow_errors(f"tracking ({redact(uri)}, experiment {cfg.experiment!r})"):
        exp_id = _experiment_id(mc, cfg.experiment, uri)
        if parent_run_id is not None:
            from mlflow.exceptions import MlflowException

            try:
                mc.get_run(parent_run_id)
            except MlflowException:
                raise TrackingError(
                    f"parent run {parent_run_id!r} does not exist in {redact(uri)}"
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
    with mlflow_errors(f"run {info.run_id}: end"):
        mc.set_terminated(info.run_id, "FINISHED")
