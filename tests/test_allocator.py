"""The stage commands re-execute themselves under jemalloc (ragtrain.allocator)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from ragtrain import allocator, cli
from ragtrain.errors import ConfigError
from tests.conftest import REPO

INSTALLED = allocator.jemalloc_path("auto")


def test_jemalloc_path_settings(tmp_path: Path) -> None:
    lib = tmp_path / "libjemalloc.so.2"
    lib.write_bytes(b"")
    missing = str(tmp_path / "none.so")
    assert allocator.jemalloc_path("system", [str(lib)]) is None
    assert allocator.jemalloc_path("auto", [missing, str(lib)]) == str(lib)
    assert allocator.jemalloc_path("", [str(lib)]) == str(lib)
    assert allocator.jemalloc_path("auto", [missing]) is None  # not installed: glibc, no error
    assert allocator.jemalloc_path(str(lib), []) == str(lib)
    with pytest.raises(ConfigError, match="RAGTRAIN_MALLOC=.*none.so: no such file"):
        allocator.jemalloc_path(missing)


def test_preload_env(tmp_path: Path) -> None:
    lib = tmp_path / "libjemalloc.so.2"
    lib.write_bytes(b"")
    search = [str(lib)]
    env = allocator.preload_env({"PATH": "/bin", "LD_PRELOAD": "/x/libother.so"}, search)
    assert env is not None
    assert env["LD_PRELOAD"] == f"{lib} /x/libother.so"  # jemalloc first, the user's kept
    assert env["MALLOC_CONF"] == allocator.JEMALLOC_CONF and env["PATH"] == "/bin"
    mine = allocator.preload_env({"MALLOC_CONF": "narenas:1"}, search)
    assert mine is not None and mine["MALLOC_CONF"] == "narenas:1"  # the user's own settings win
    assert allocator.preload_env({"LD_PRELOAD": str(lib)}, search) is None  # already: no loop
    assert allocator.preload_env({"RAGTRAIN_MALLOC": "system"}, search) is None
    assert allocator.preload_env({}, [str(tmp_path / "none.so")]) is None


def test_stage_command_reexecutes(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """`ragtrain <stage>` replaces itself by the same command under jemalloc."""
    lib = tmp_path / "libjemalloc.so.2"
    lib.write_bytes(b"")
    calls: list[tuple[str, list[str], dict[str, str]]] = []

    class Replaced(Exception):
        pass

    def execve(path: str, args: list[str], env: dict[str, str]) -> None:
        calls.append((path, args, env))
        raise Replaced

    monkeypatch.setenv("RAGTRAIN_MALLOC", str(lib))
    monkeypatch.delenv("LD_PRELOAD", raising=False)
    monkeypatch.setattr(allocator.os, "execve", execve)
    monkeypatch.setattr(allocator.sys, "platform", "linux")
    monkeypatch.chdir(tmp_path)
    argv = ["--params", str(REPO / "params.yaml"), "prepare"]
    monkeypatch.setattr(sys, "argv", ["ragtrain", *argv])
    with pytest.raises(Replaced):
        cli.main()  # as the console script calls it
    path, args, env = calls[0]
    assert path == sys.executable
    assert args == [sys.executable, "-m", "ragtrain.cli", *argv]
    assert env["LD_PRELOAD"] == str(lib) and "dirty_decay_ms:-1" in env["MALLOC_CONF"]


def test_unusable_setting_is_refused(tmp_path: Path) -> None:
    env = {**os.environ, "RAGTRAIN_MALLOC": str(tmp_path / "missing.so")}
    env.pop("LD_PRELOAD", None)
    r = subprocess.run([sys.executable, "-m", "ragtrain.cli", "--params",
                        str(REPO / "params.yaml"), "prepare"], cwd=tmp_path, env=env,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2
    assert f"RAGTRAIN_MALLOC={tmp_path / 'missing.so'}: no such file" in r.stderr


@pytest.mark.skipif(INSTALLED is None, reason="jemalloc is not installed (libjemalloc2)")
def test_preloaded_environment_loads_jemalloc() -> None:
    """The environment the CLI re-executes under really maps jemalloc into a torch process."""
    env = allocator.preload_env({k: v for k, v in os.environ.items()
                                 if k not in ("LD_PRELOAD", "RAGTRAIN_MALLOC")})
    assert env is not None
    code = ("import torch; torch.ones(1 << 20).sum(); "
            "print(any('jemalloc' in line for line in open('/proc/self/maps')))")
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "True"


RELEASE = """
import torch
from ragtrain.allocator import release_free_memory
def rss():
    return int(open("/proc/self/statm").read().split()[1]) * 4096
# blocks of ever-changing sizes, as training batches are, all freed again
blocks = [torch.ones(200_000 + 4096 * i) for i in range(300)]
del blocks
before = rss()
ok = release_free_memory()
print(ok, before - rss())
"""


@pytest.mark.skipif(INSTALLED is None, reason="jemalloc is not installed (libjemalloc2)")
def test_release_returns_kept_pages_under_jemalloc() -> None:
    """Without decay jemalloc keeps every freed page; the purge hands them back."""
    env = allocator.preload_env({k: v for k, v in os.environ.items()
                                 if k not in ("LD_PRELOAD", "RAGTRAIN_MALLOC")})
    assert env is not None
    r = subprocess.run([sys.executable, "-c", RELEASE], env=env, capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    ok, freed = r.stdout.split()
    assert ok == "True"
    assert int(freed) > 500_000_000  # ~1.2 GB allocated, all of it free


def test_release_is_a_no_op_without_jemalloc() -> None:
    env = {k: v for k, v in os.environ.items() if k not in ("LD_PRELOAD", "MALLOC_CONF")}
    r = subprocess.run([sys.executable, "-c", RELEASE], env=env, capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.split()[0] == "False"
