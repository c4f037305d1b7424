"""Run lineage: the git commit, the dvc.lock hashes and the library versions behind a run."""

from __future__ import annotations

import importlib.metadata
import platform
import re
import subprocess
from collections.abc import Mapping
from pathlib import Path


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
    import yaml

    # every stage's run reads the whole lock: libyaml's reader, every scalar kept as its text
    # (a hash is a string whatever it looks like); 0.02 s where pure-Python YAML took 0.16 s
    loader = getattr(yaml, "CBaseLoader", yaml.BaseLoader)
    try:
        doc = yaml.load(lock.read_text(encoding="utf-8"), Loader=loader) or {}
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as e:
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
