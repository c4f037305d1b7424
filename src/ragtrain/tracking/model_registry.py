"""MLflow model registry calls: register versions, move aliases, tag, download and load them.

The orchestration (register a RAG model, promote, roll back) is ``tracking.registry``.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ragtrain.errors import TrackingError
from ragtrain.tracking.runs import MAX_TAG_LEN, RunHandle, redact, redact_value, truncate_value
from ragtrain.tracking.store import client, explain, mlflow_errors, resolve_uri

if TYPE_CHECKING:
    from ragtrain.config import TrackingConfig


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
    with mlflow_errors(f"register {name!r} from run {run_id}"):
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
            name, source, run_id=run_id,
            tags={k: str(redact_value(k, v)) for k, v in (tags or {}).items()}
        )
    return str(mv.version)


def set_alias(cfg: TrackingConfig, name: str, alias: str, version: str, *,
              root: Path = Path(".")) -> None:
    """Point ``name@alias`` at ``version`` (moving it if it pointed elsewhere)."""
    with mlflow_errors(f"set alias {name}@{alias} -> {version}"):
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
        raise TrackingError(f"get alias {name}@{alias}: {explain(e)}") from e
    v = (rm.aliases or {}).get(alias)
    return None if v is None else str(v)


def delete_alias(cfg: TrackingConfig, name: str, alias: str, *, root: Path = Path(".")) -> None:
    """Remove ``name@alias``; a no-op when the model or the alias does not exist."""
    if get_alias(cfg, name, alias, root=root) is None:
        return
    with mlflow_errors(f"delete alias {name}@{alias}"):
        client(cfg.uri, root).delete_registered_model_alias(name, alias)


def tag_version(cfg: TrackingConfig, name: str, version: str, tags: Mapping[str, Any], *,
                root: Path = Path(".")) -> None:
    """Set tags on one model version (values stringified)."""
    mc = client(cfg.uri, root)
    with mlflow_errors(f"tag {name} version {version}"):
        for k, v in tags.items():
            value = truncate_value(redact_value(k, v), MAX_TAG_LEN, k, "tag")
            mc.set_model_version_tag(name, str(version), k, value)


def version_tags(cfg: TrackingConfig, name: str, version: str, *,
                 root: Path = Path(".")) -> dict[str, str]:
    """The tags of ``name`` version ``version``."""
    with mlflow_errors(f"tags of {name} version {version}"):
        return dict(client(cfg.uri, root).get_model_version(name, str(version)).tags)


def version_run(cfg: TrackingConfig, name: str, version: str, *,
                root: Path = Path(".")) -> tuple[str, dict[str, str], dict[str, str]]:
    """(run id, params, tags) of the run that logged ``name`` version ``version``; empty
    params and tags when that run is gone."""
    from mlflow.exceptions import MlflowException

    mc = client(cfg.uri, root)
    with mlflow_errors(f"run of {name} version {version}"):
        run_id = mc.get_model_version(name, str(version)).run_id or ""
    if not run_id:
        return "", {}, {}
    try:
        r = mc.get_run(run_id)
    except MlflowException:
        return run_id, {}, {}
    return run_id, dict(r.data.params), dict(r.data.tags)


def delete_version(cfg: TrackingConfig, name: str, version: str, *,
                   root: Path = Path(".")) -> None:
    """Delete one model version, and the registered model if it has no version left."""
    mc = client(cfg.uri, root)
    with mlflow_errors(f"delete {name} version {version}"):
        mc.delete_model_version(name, str(version))
        if not mc.search_model_versions(f"name = '{name}'"):
            mc.delete_registered_model(name)


def download_version(cfg: TrackingConfig, name: str, version: str, dst: Path, *,
                     root: Path = Path(".")) -> Path:
    """Download the artifacts of ``name`` version ``version`` into ``dst``; returns the folder."""
    from mlflow.artifacts import download_artifacts

    mc = client(cfg.uri, root)
    with mlflow_errors(f"download {name} version {version}"):
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
        raise TrackingError(f"no model {name}@{alias} in {redact(cfg.uri)}")
    local = download_version(cfg, name, version, dst, root=root)
    with mlflow_errors(f"load {name} version {version}"):
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
    with tempfile.TemporaryDirectory() as tmp, mlflow_errors(f"log RAG model {bundle}"):
        out = tracking_pyfunc.save_rag_pyfunc(bundle, Path(tmp) / "model", example_questions,
                                              **kwargs)
        run.log_artifact(out, artifact_path)
    return artifact_path


LOCK_SUFFIX = ".promotion-lock"  # a registered model that exists while its holder moves aliases


@contextlib.contextmanager
def registry_lock(cfg: TrackingConfig, name: str, *, root: Path = Path("."),
                  wait_s: float = 60.0, stale_after_s: float = 600.0) -> Iterator[None]:
    """Hold ``name``'s promotion lock: one promote or rollback at a time, across machines.

    The lock is the registered model ``<name>.promotion-lock``: creating a registered model is
    atomic in MLflow's store (a unique name, in sqlite or a server's database), so of two
    callers exactly one creates it; the other waits (up to ``wait_s``) and then refuses, naming
    the holder. A lock older than ``stale_after_s`` (its holder crashed), or held by a process of
    this host that no longer runs, is broken. Registering takes it too (``registry.register``).
    """
    import os
    import socket

    from mlflow.exceptions import MlflowException

    from ragtrain.errors import RegistryError

    lock, mc = f"{name}{LOCK_SUFFIX}", client(cfg.uri, root)
    owner = f"{socket.gethostname()}:{os.getpid()}"
    deadline = time.monotonic() + wait_s
    while True:
        with mlflow_errors(f"lock {name} for promotion"):
            held = _try_lock(mc, lock, owner)
        if held is None:
            break  # ours
        if not held:
            continue  # released between our two calls: try again
        since = float(held.get("since", "0") or 0)
        if time.time() - since > stale_after_s or _dead_here(held.get("owner", "")):
            with contextlib.suppress(MlflowException):
                mc.delete_registered_model(lock)  # its holder died: break it
            continue
        if time.monotonic() > deadline:
            raise RegistryError(
                f"{name}: another promotion or rollback holds the registry lock "
                f"({held.get('owner', '?')}, for {time.time() - since:.0f} s); try again when "
                f"it ends (a crashed holder's lock is broken after {stale_after_s:.0f} s, or "
                f"delete the registered model {lock!r})")
        time.sleep(0.2)
    try:
        yield
    finally:
        with contextlib.suppress(MlflowException):
            mc.delete_registered_model(lock)


def _dead_here(owner: str) -> bool:
    """Whether ``owner`` ("host:pid") is a process of this host that has ended."""
    import os
    import socket

    host, _, pid = owner.rpartition(":")
    if host != socket.gethostname() or not pid.isdigit():
        return False
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return True
    except PermissionError:  # alive, someone else's
        return False
    return False


def sweep_orphans(cfg: TrackingConfig, name: str, components: Mapping[str, str], *,
                  root: Path = Path(".")) -> list[tuple[str, str]]:
    """Delete the component versions a failed registration left: no alias, and named by no
    version of the RAG model ``name`` (its ``ragtrain.<component>_version`` tags). Call it
    under ``registry_lock``, which every registration holds, so no registration is half-way.
    ``components``: component -> registered model name. Returns what was deleted."""
    from mlflow.exceptions import MlflowException

    mc = client(cfg.uri, root)
    gone: list[tuple[str, str]] = []
    with mlflow_errors(f"look for versions a failed registration of {name!r} left"):
        try:
            rags = mc.search_model_versions(f"name = '{name}'")
        except MlflowException:
            rags = []
        for component, model in components.items():
            used = {str(v.tags.get(f"ragtrain.{component}_version")) for v in rags}
            try:
                aliased = {str(v) for v in (mc.get_registered_model(model).aliases or {}
                                            ).values()}
            except MlflowException:
                continue  # no such model: nothing left behind
            for v in mc.search_model_versions(f"name = '{model}'"):
                if str(v.version) not in used and str(v.version) not in aliased:
                    mc.delete_model_version(model, str(v.version))
                    gone.append((model, str(v.version)))
    return gone


def _try_lock(mc: Any, lock: str, owner: str) -> dict[str, str] | None:
    """None: created (the lock is ours); else the holder's tags ({} if it just vanished)."""
    from mlflow.exceptions import MlflowException

    try:
        mc.create_registered_model(lock, tags={"owner": owner, "since": f"{time.time():.3f}"},
                                   description="ragtrain: a promotion or rollback of this "
                                   "model is in progress")
        return None
    except MlflowException as e:
        if e.error_code in ("RESOURCE_DOES_NOT_EXIST", "NOT_FOUND"):
            return {}  # MLflow's store found the name taken, then re-read it after its holder
            # released it (a race seen in CI against a server): free again, try again
        if e.error_code != "RESOURCE_ALREADY_EXISTS":
            raise
    try:
        return dict(mc.get_registered_model(lock).tags)
    except MlflowException as e:
        if e.error_code in ("RESOURCE_DOES_NOT_EXIST", "NOT_FOUND"):
            return {}
        raise
