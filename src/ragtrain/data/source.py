"""Fetch the raw data source (a local path or an http(s) URL) and verify its pinned sha256."""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import shutil
import stat
import urllib.error
import urllib.parse
import urllib.request
import zipfile
from collections.abc import Iterable, Sequence
from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import Any

from ragtrain.errors import SourceError
from ragtrain.io import atomic_path, sha256_file

MANIFEST = "SOURCE.json"
_CHUNK = 1 << 20


def is_url(source: str) -> bool:
    return urllib.parse.urlparse(source).scheme in ("http", "https")


def _sha256_stream(chunks: Iterable[bytes]) -> str:
    h = hashlib.sha256()
    for c in chunks:
        h.update(c)
    return h.hexdigest()


def _file_chunks(f: Any) -> Iterable[bytes]:
    while chunk := f.read(_CHUNK):
        yield chunk


def sha256_payload(path: Path, name_for_errors: str | None = None) -> str | None:
    """sha256 of the decompressed payload of a .gz or a one-member .zip; None otherwise."""
    name = path.name.lower()
    try:
        if name.endswith(".gz"):
            with gzip.open(path, "rb") as f:
                return _sha256_stream(_file_chunks(f))
        if name.endswith(".zip"):
            with zipfile.ZipFile(path) as z:
                members = [m for m in z.infolist() if not m.is_dir()]
                if len(members) == 1:
                    with z.open(members[0]) as f:
                        return _sha256_stream(_file_chunks(f))
    except (OSError, zipfile.BadZipFile, EOFError) as e:
        raise SourceError(
            f"{name_for_errors or path}: not a valid {path.suffix[1:]} file ({e})"
        ) from None
    return None


def sha256_tree(root: Path) -> str:
    """sha256 over the sorted relative paths and file hashes of a folder."""
    h = hashlib.sha256()
    for p in sorted(q for q in root.rglob("*") if q.is_file()):
        h.update(f"{p.relative_to(root).as_posix()}\0{sha256_file(p)}\n".encode())
    return h.hexdigest()


def unsafe_zip_member(info: zipfile.ZipInfo) -> str | None:
    """Why a zip member may not be read as data (a path outside the archive's folder, a
    symbolic link: a crafted archive's ways to reach other files); None when it is safe."""
    name = info.filename.replace("\\", "/")
    if name.startswith("/") or PureWindowsPath(info.filename).drive:
        return "an absolute path"
    if ".." in PurePosixPath(name).parts:
        return "a path that escapes the archive's folder (..)"
    if stat.S_ISLNK(info.external_attr >> 16):
        return "a symbolic link"
    return None


def check_zip(path: Path, name_for_errors: str) -> None:
    """Refuse a .zip with a member :func:`unsafe_zip_member` rejects, naming the member."""
    try:
        with zipfile.ZipFile(path) as z:
            infos = z.infolist()
    except (OSError, zipfile.BadZipFile) as e:
        raise SourceError(f"{name_for_errors}: not a valid zip file ({e})") from None
    for info in infos:
        if why := unsafe_zip_member(info):
            raise SourceError(f"{name_for_errors}: member {info.filename!r} is {why}; refused "
                              "(a data archive holds plain files under its own folder)")


def find_symlink(root: Path) -> Path | None:
    """The first symbolic link under the folder ``root`` (links are not followed); None if none."""
    for here, dirs, names in os.walk(root):
        for n in sorted(dirs + names):
            if (Path(here) / n).is_symlink():
                return Path(here) / n
    return None


def _download(url: str, dest: Path, timeout_s: float) -> None:
    hint = (
        "If this machine is offline, point data.source at a local copy, e.g. "
        "`ragtrain params set data.source=/path/to/dev-v1.1.json.zip` "
        "or `make demo DATA_SOURCE=/path/to/dev-v1.1.json.zip`"
    )
    try:
        req = urllib.request.Request(url, headers={"User-Agent": "ragtrain"})
        with urllib.request.urlopen(req, timeout=timeout_s) as r, open(dest, "wb") as f:
            shutil.copyfileobj(r, f, _CHUNK)
    except urllib.error.HTTPError as e:
        raise SourceError(f"data.source: cannot download {url}: HTTP {e.code} {e.reason}") from None
    except (urllib.error.URLError, TimeoutError, OSError) as e:
        reason = getattr(e, "reason", e)
        raise SourceError(f"data.source: cannot download {url}: {reason}. {hint}") from None


def _verify(path: Path, expected: str, source: str) -> dict[str, Any]:
    file_sha = sha256_tree(path) if path.is_dir() else sha256_file(path)
    payload_sha = None if path.is_dir() else sha256_payload(path, source)
    if expected and expected not in (file_sha, payload_sha):
        got = f"file {file_sha}" + (f", decompressed payload {payload_sha}" if payload_sha else "")
        raise SourceError(
            f"data.sha256: checksum mismatch for {source}: expected {expected}, got {got}. "
            "Is it the right file? If you changed the data on purpose, set data.sha256 to the "
            "new hash (or to \"\" to skip the check)."
        )
    return {"sha256_file": file_sha, "sha256_payload": payload_sha}


def _copy_in(source: str, tmp: Path, root: Path, timeout_s: float) -> Path:
    """Copy or download one location into ``tmp``; the path of the copy."""
    if is_url(source):
        dest = tmp / (Path(urllib.parse.urlparse(source).path).name or "download")
        _download(source, dest, timeout_s)
        return dest
    src = Path(source).expanduser()
    if not src.is_absolute():
        src = root / src
    if not src.exists():
        raise SourceError(f"data.source: {source} does not exist (resolved to {src.resolve()})")
    dest = tmp / src.name
    if src.is_dir():
        if link := find_symlink(src):
            raise SourceError(f"data.source: {link} is a symbolic link; refused (a data folder "
                              "holds plain files: copy the file in instead of linking it)")
        shutil.copytree(src, dest, symlinks=True)
    else:
        shutil.copyfile(src, dest)
    return dest


def fetch_source(source: str | Sequence[str], expected_sha256: str, out_dir: Path, *,
                 root: Path, timeout_s: float = 60.0) -> dict[str, Any]:
    """Copy or download ``source`` (or the first of its mirrors that can be had) into
    ``out_dir`` (atomically), verify it; return the manifest."""
    locations = [source] if isinstance(source, str) else list(source)
    if not any(loc.strip() for loc in locations):
        raise SourceError("data.source: empty; set it to a local path or an http(s) URL")
    failures: list[str] = []
    with atomic_path(out_dir) as tmp:
        tmp.mkdir()
        for loc in locations:
            try:
                dest = _copy_in(loc, tmp, root, timeout_s)
                if dest.name.lower().endswith(".zip"):
                    check_zip(dest, f"data.source: {loc}")
                break
            except SourceError as e:
                if len(locations) == 1:
                    raise
                failures.append(str(e).removeprefix("data.source: "))
                for left in tmp.iterdir():  # e.g. a download cut off half-way
                    shutil.rmtree(left) if left.is_dir() else left.unlink()
        else:
            raise SourceError(f"data.source: none of its {len(locations)} locations could be "
                              "fetched: " + "; ".join(failures))
        hashes = _verify(dest, expected_sha256, loc)
        manifest = {
            "source": loc,
            "file": dest.name,
            "pinned_sha256": expected_sha256 or None,
            **hashes,
        }
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
    return manifest


def raw_payload(raw_dir: Path) -> Path:
    """The fetched file or folder inside ``raw_dir`` (named in its manifest)."""
    manifest = raw_dir / MANIFEST
    if not manifest.exists():
        raise SourceError(f"{manifest}: missing; run `ragtrain fetch` first")
    name = json.loads(manifest.read_text(encoding="utf-8"))["file"]
    return raw_dir / name
