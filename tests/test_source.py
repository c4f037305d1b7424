"""data.source as a list of mirrors of one file: the first that can be had is used; and
sources that could reach files outside themselves (zip members with `..` or an absolute path,
symbolic links in a zip or a folder) are refused, naming the member or the link."""

from __future__ import annotations

import hashlib
import json
import re
import shutil
import stat
import zipfile
from pathlib import Path

import pytest

from ragtrain.data.formats import read_dataset
from ragtrain.data.source import MANIFEST, fetch_source
from ragtrain.errors import DataError, SourceError
from tests.conftest import FIXTURES


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


# --------------------------------------------------------------------------- unsafe sources


def _zip(path: Path, members: list[tuple[str, bytes, int | None]]) -> Path:
    """A zip of (name, body, unix mode or None) members, written as given (no name cleaning)."""
    with zipfile.ZipFile(path, "w") as z:
        for name, body, mode in members:
            info = zipfile.ZipInfo(name)
            if mode is not None:
                info.external_attr = mode << 16
            z.writestr(info, body)
    return path


GOOD = ("data/dev.json", b'{"data": []}', None)


@pytest.mark.parametrize("member, why", [
    (("../evil.json", b"{}", None), "a path that escapes the archive's folder"),
    (("data/../../evil.json", b"{}", None), "a path that escapes the archive's folder"),
    (("/etc/evil.json", b"{}", None), "an absolute path"),
    (("C:/evil.json", b"{}", None), "an absolute path"),
    (("data/link.json", b"/etc/passwd", stat.S_IFLNK | 0o777), "a symbolic link"),
])
def test_a_zip_member_outside_its_folder_or_a_link_is_refused(
        tmp_path: Path, member: tuple[str, bytes, int | None], why: str) -> None:
    src = _zip(tmp_path / "src.zip", [GOOD, member])
    out = tmp_path / "raw"
    with pytest.raises(SourceError) as e:
        fetch_source(str(src), "", out, root=tmp_path)
    assert f"src.zip: member {member[0]!r} is {why}" in str(e.value)
    assert not out.exists()  # nothing fetched, no temp folder left
    assert not (tmp_path / "evil.json").exists() and not Path("/etc/evil.json").exists()
    # the reader refuses it too (a data/raw put there by hand or by `dvc pull`)
    with pytest.raises(DataError, match=f"src.zip:{re.escape(member[0])}: a zip member that is"):
        read_dataset(src)


def test_a_plain_zip_is_fetched(tmp_path: Path) -> None:
    src = _zip(tmp_path / "src.zip", [GOOD, ("data/", b"", stat.S_IFDIR | 0o755)])
    m = fetch_source(str(src), "", tmp_path / "raw", root=tmp_path)
    assert m["file"] == "src.zip" and (tmp_path / "raw/src.zip").is_file()


@pytest.mark.parametrize("link_kind", ["file", "folder"])
def test_a_symlink_in_a_folder_source_is_refused(tmp_path: Path, link_kind: str) -> None:
    secret = tmp_path / "secret"
    secret.mkdir()
    (secret / "passwords.txt").write_text("hunter2\n")
    src = tmp_path / "pair"
    shutil.copytree(FIXTURES / "tiny_jsonl", src)
    link = src / ("extra.jsonl" if link_kind == "file" else "sub")
    link.symlink_to(secret / "passwords.txt" if link_kind == "file" else secret)
    out = tmp_path / "raw"
    with pytest.raises(SourceError) as e:
        fetch_source(str(src), "", out, root=tmp_path)
    assert str(e.value) == (f"data.source: {link} is a symbolic link; refused (a data folder "
                            "holds plain files: copy the file in instead of linking it)")
    assert not out.exists()
    with pytest.raises(DataError, match=f"{re.escape(str(link))}: a symbolic link in the data"):
        read_dataset(src)


def test_an_unsafe_mirror_is_skipped_and_named(tmp_path: Path) -> None:
    bad = _zip(tmp_path / "bad.zip", [GOOD, ("../evil.json", b"{}", None)])
    good = _zip(tmp_path / "good.zip", [GOOD])
    m = fetch_source([str(bad), str(good)], "", tmp_path / "raw", root=tmp_path)
    assert m["source"] == str(good)
    with pytest.raises(SourceError, match=r"bad.zip: member '../evil.json' is a path"):
        fetch_source([str(bad), "nowhere.zip"], "", tmp_path / "raw2", root=tmp_path)
