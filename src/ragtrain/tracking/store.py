"""The MLflow store: resolve the tracking URI, check it is usable, bind a client to it.

Nothing here imports mlflow at module level, and nothing touches MLflow's global tracking URI.
"""

from __future__ import annotations

import contextlib
import os
import sqlite3
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import urlparse

from ragtrain.errors import TrackingError

if TYPE_CHECKING:
    from mlflow.tracking import MlflowClient

_SQLITE_PREFIX = "sqlite:///"
_FIX_HINT = "use tracking.uri: sqlite:///mlruns/mlflow.db"


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
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    resolved = resolve_uri(uri, root)
    db = sqlite_path(resolved)
    if db is not None:
        db.parent.mkdir(parents=True, exist_ok=True)
    try:
        return MlflowClient(tracking_uri=resolved, registry_uri=resolved)
    except MlflowException as e:  # e.g. a ./mlruns file store, which MLflow >= 3.13 refuses
        raise TrackingError(f"tracking.uri {uri}: {e.message} (use a database store, e.g. the "
                            "default sqlite:///mlruns/mlflow.db)") from None


@contextlib.contextmanager
def mlflow_errors(what: str) -> Iterator[None]:
    """Turn MlflowException into a one-line TrackingError that says what was being done."""
    from mlflow.exceptions import MlflowException

    try:
        yield
    except MlflowException as e:
        raise TrackingError(f"{what}: {explain(e)}") from e


def explain(e: Exception) -> str:
    """An MLflow error's message; a refusal of an authenticating server (HTTP 401 / 403) says
    which credentials ragtrain sent and how to send others."""
    code = str(getattr(e, "error_code", ""))
    message = str(getattr(e, "message", e))
    user = os.environ.get("MLFLOW_TRACKING_USERNAME")
    if code in ("UNAUTHENTICATED", "CUSTOMER_UNAUTHORIZED") or "error code 401" in message:
        return ("not authenticated: the MLflow server requires a login"
                + (f" and refused user {user!r}" if user else " and none was given")
                + "; set MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD (see "
                "docs/security.md)")
    if code == "PERMISSION_DENIED" or "error code 403" in message:
        return (f"permission denied to {'user ' + repr(user) if user else 'an anonymous user'}"
                " by the MLflow server: this needs EDIT (or MANAGE) permission on the model or "
                "experiment; ask an MLflow admin to grant it, or set MLFLOW_TRACKING_USERNAME "
                "and MLFLOW_TRACKING_PASSWORD to an account that has it (see docs/security.md)")
    return message
