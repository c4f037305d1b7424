"""The champion's record: what a run report compares a new run with."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ragtrain import tracking
from ragtrain.config import RegistryConfig, TrackingConfig
from ragtrain.tracking.registry import CHAMPION, EVAL_SET_TAG, metrics_of


def champion_record(rcfg: RegistryConfig, tcfg: TrackingConfig, *,
                    root: Path = Path(".")) -> dict[str, Any] | None:
    """What a run report compares with: the champion's version, its run, its recorded metrics,
    the params and lineage tags (git, dvc.lock, versions) of its run; None without a champion
    (or without a store yet: nothing is created to find out)."""
    db = tracking.sqlite_path(tcfg.uri, root)
    if db is not None and not db.is_file():
        return None
    tracking.check_store(tcfg.uri, root=root)
    name = rcfg.model_name
    version = tracking.get_alias(tcfg, name, CHAMPION, root=root)
    if version is None:
        return None
    tags = tracking.version_tags(tcfg, name, version, root=root)
    run_id, params, run_tags = tracking.version_run(tcfg, name, version, root=root)
    return {"version": version, "run_id": run_id, "metrics": metrics_of(tags),
            "params": params, "eval_set_sha256": tags.get(EVAL_SET_TAG, ""),
            "lineage": {k: v for k, v in run_tags.items()
                        if k.startswith(("git.", "dvc.", "version."))}}
