"""DVC on object storage: a tiny project's `dvc repro`, `dvc push` to an S3 bucket (moto's S3
server on a free loopback port), then a fresh `git clone` that `dvc pull`s everything and has
no stage to rerun. The remote is the committed `s3://bucket/path` + `endpointurl`, as a team
shares it; the credentials are fake, in the environment of this test only."""

from __future__ import annotations

import contextlib
import subprocess
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from ragtrain.config import set_params
from tests.conftest import BIN
from tests.test_dvc_pipeline import ENV, copy_repo, sh
from tests.test_flow import tiny_overrides
from tests.test_ui import free_port, stop, wait

pytestmark = pytest.mark.slow

BUCKET, PREFIX = "ragtrain-dvc", "store"
TARGET = "build_index"  # data, a trained (tiny) retriever and its index: files and folders
CREDENTIALS = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
               "AWS_DEFAULT_REGION": "us-east-1", "AWS_EC2_METADATA_DISABLED": "true"}


@contextlib.contextmanager
def s3_server(log_path: Path) -> Iterator[str]:
    """moto's S3-compatible server (`moto_server`, from moto[server]) on a free loopback port;
    yields its endpoint URL, stops it on exit."""
    port = free_port()
    log = open(log_path, "w")
    server = subprocess.Popen([str(BIN / "moto_server"), "-H", "127.0.0.1", "-p", str(port)],
                              stdout=log, stderr=log)
    url = f"http://127.0.0.1:{port}"
    try:
        wait(lambda: server.poll() is not None
             or urllib.request.urlopen(f"{url}/moto-api/", timeout=2).status == 200,
             60, "moto_server")
        assert server.poll() is None, log_path.read_text()[-3000:]
        yield url
    finally:
        stop(server)
        log.close()


def bucket_keys(s3, prefix: str) -> set[str]:
    keys: set[str] = set()
    for page in s3.get_paginator("list_objects_v2").paginate(Bucket=BUCKET, Prefix=prefix):
        keys.update(o["Key"] for o in page.get("Contents", []))
    return keys


def test_push_to_s3_then_a_fresh_clone_pulls_and_reruns_nothing(
        tmp_path: Path, tiny_bert_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import boto3

    for k, v in CREDENTIALS.items():  # the dvc subprocesses' environment (sh uses ENV)
        monkeypatch.setitem(ENV, k, v)
    with s3_server(tmp_path / "moto.log") as endpoint:
        s3 = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1",
                          aws_access_key_id="testing", aws_secret_access_key="testing")
        s3.create_bucket(Bucket=BUCKET)

        proj = copy_repo(tmp_path / "proj")
        set_params(proj / "params.yaml", {**tiny_overrides(tiny_bert_dir),
                                          "tracking.enabled": False})
        sh(proj, "dvc", "remote", "add", "-d", "s3", f"s3://{BUCKET}/{PREFIX}")
        sh(proj, "dvc", "remote", "modify", "s3", "endpointurl", endpoint)
        out = sh(proj, "dvc", "repro", TARGET)
        for stage in ("fetch", "prepare", "train_retriever", "build_index"):
            assert f"Running stage '{stage}'" in out
        sh(proj, "git", "add", "-A")
        sh(proj, "git", "commit", "-q", "-m", "tiny run, S3 remote")

        sh(proj, "dvc", "push", "--with-deps", TARGET)
        cache = proj / ".dvc/cache"
        local = {str(p.relative_to(cache)) for p in cache.rglob("*")
                 if p.is_file() and "runs" not in p.relative_to(cache).parts}
        pushed = bucket_keys(s3, f"{PREFIX}/")
        assert pushed and pushed <= {f"{PREFIX}/{k}" for k in local}  # DVC's layout: files/md5
        assert any(k.endswith(".dir") for k in pushed)  # folder outs went too
        status = sh(proj, "dvc", "status", "--cloud", "--with-deps", TARGET)
        assert "in sync" in status  # nothing left to push

        clone = tmp_path / "clone"
        sh(tmp_path, "git", "clone", "-q", str(proj), str(clone))
        assert not (clone / "artifacts/index").exists() and not (clone / ".dvc/cache").exists()
        sh(clone, "dvc", "pull", "--with-deps", TARGET)  # stages that ran
        for out_dir in ("data/prepared", "artifacts/retriever", "artifacts/index"):
            assert any((clone / out_dir).iterdir()), out_dir
        assert "Data and pipelines are up to date" in sh(clone, "dvc", "status", "--with-deps",
                                                         TARGET)
        out = sh(clone, "dvc", "repro", TARGET)
        assert "Data and pipelines are up to date" in out and "Running stage" not in out
