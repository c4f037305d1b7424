"""data.source as a list of mirrors of one file: the first that can be had is used."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

from ragtrain.data.source import MANIFEST, fetch_source
from ragtrain.errors import SourceError


def _file(tmp_path: Path, name: str, body: bytes) -> Path:
    p = tmp_path / name
    p.write_bytes(body)
    return p


def test_first_mirror_that_exists_is_used(tmp_path: Path) -> None:
    body = b'{"data": []}'
    good = _file(tmp_path, "copy.json", body)
    out = tmp_path / "raw"
    m = fetch_source(["nowhere/dev.json", "http://127.0.0.1:9/dev.json", str(good)],
                     hashlib.sha256(body).hexdigest(), out, root=tmp_path, timeout_s=2.0)
    assert m["source"] == str(good) and m["file"] == "copy.json"
    assert sorted(p.name for p in out.iterdir()) == sorted(["copy.json", MANIFEST])
    assert json.loads((out / MANIFEST).read_text())["source"] == str(good)


def test_earlier_mirror_wins_and_unreachable_url_leaves_nothing(tmp_path: Path) -> None:
    a = _file(tmp_path, "a.json", b"1")
    out = tmp_path / "raw"
    m = fetch_source([str(a), "http://127.0.0.1:9/dev.json"], "", out, root=tmp_path)
    assert m["source"] == str(a)


def test_no_mirror_can_be_had_names_each(tmp_path: Path) -> None:
    out = tmp_path / "raw"
    with pytest.raises(SourceError) as e:
        fetch_source(["nowhere/a.json", "http://127.0.0.1:9/b.json"], "", out,
                     root=tmp_path, timeout_s=2.0)
    msg = str(e.value)
    assert msg.startswith("data.source: none of its 2 locations could be fetched")
    assert "nowhere/a.json does not exist" in msg and "cannot download http://127.0.0.1:9" in msg
    assert not out.exists()


def test_a_mirror_with_other_bytes_is_refused(tmp_path: Path) -> None:
    bad = _file(tmp_path, "bad.json", b"other")
    out = tmp_path / "raw"
    with pytest.raises(SourceError, match="checksum mismatch"):
        fetch_source(["nowhere/a.json", str(bad)], "0" * 64, out, root=tmp_path)
    assert not out.exists()
