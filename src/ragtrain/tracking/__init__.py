"""MLflow at the edge: the only package that imports mlflow, always inside functions.

``import ragtrain.tracking`` stays cheap. Everything goes through an ``MlflowClient`` bound to
the configured URI: nothing here touches MLflow's global tracking URI or active-run state.

- ``store``: resolve and check the tracking URI, bind a client;
- ``runs``: ``run()`` and its ``RunHandle``, MLflow's name rules, ``redact`` (secrets);
- ``lineage``: git, dvc.lock hashes and library versions behind a run;
- ``promotion``: the pure promotion rule ``should_promote``;
- ``model_registry``: registry calls (versions, aliases, tags, the RAG pyfunc model);
- ``plots``: training curves and recall@k;
- ``registry``: register / promote / roll back, built on the calls; ``pyfunc``: the model.
"""

from __future__ import annotations

from ragtrain.tracking.lineage import lineage
from ragtrain.tracking.model_registry import (
    delete_alias,
    delete_version,
    download_version,
    get_alias,
    load_rag_model,
    log_rag_model,
    register_model,
    registry_lock,
    set_alias,
    sweep_orphans,
    tag_version,
    version_run,
    version_tags,
)
from ragtrain.tracking.plots import plot_curve, plot_recall_at_k
from ragtrain.tracking.promotion import Decision, should_promote
from ragtrain.tracking.runs import (
    DATASET_CONTEXT_TAG,
    PARENT_RUN_TAG,
    RunHandle,
    check_name,
    redact,
    run,
)
from ragtrain.tracking.store import artifact_root, check_store, client, resolve_uri, sqlite_path

__all__ = [
    "DATASET_CONTEXT_TAG",
    "PARENT_RUN_TAG",
    "Decision",
    "RunHandle",
    "artifact_root",
    "check_name",
    "check_store",
    "client",
    "delete_alias",
    "delete_version",
    "download_version",
    "get_alias",
    "lineage",
    "load_rag_model",
    "log_rag_model",
    "plot_curve",
    "plot_recall_at_k",
    "redact",
    "register_model",
    "registry_lock",
    "sweep_orphans",
    "resolve_uri",
    "run",
    "set_alias",
    "should_promote",
    "sqlite_path",
    "tag_version",
    "version_run",
    "version_tags",
]
