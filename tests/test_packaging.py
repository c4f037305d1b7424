"""constraints.txt: the package versions `make venv` installs under (the reference run's)."""

from __future__ import annotations

import tomllib
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parents[1]
EXTRAS = ("dev", "bench", "lora", "onnx")  # what a CPU machine installs; not gpu (faiss-gpu)


def pins() -> dict[str, str]:
    out: dict[str, str] = {}
    for n, line in enumerate((ROOT / "constraints.txt").read_text().splitlines(), 1):
        if not line.strip() or line.startswith("#"):
            continue
        req = Requirement(line)
        spec = list(req.specifier)
        assert len(spec) == 1 and spec[0].operator == "==", f"constraints.txt:{n}: {line}"
        name = canonicalize_name(req.name)
        assert name not in out, f"constraints.txt:{n}: {name} pinned twice"
        out[name] = spec[0].version
    return out


def test_every_dependency_is_pinned_except_torch() -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    reqs = [*project["dependencies"],
            *(r for extra in EXTRAS for r in project["optional-dependencies"][extra])]
    names = {canonicalize_name(Requirement(r).name) for r in reqs}
    have = pins()
    assert "torch" not in have  # the Makefile's TORCH_SPEC picks the build for the machine
    missing = sorted(names - set(have) - {"torch"})
    assert not missing, f"not in constraints.txt (run `make constraints`): {missing}"
    for r in map(Requirement, reqs):  # each pin satisfies pyproject's range
        name = canonicalize_name(r.name)
        if name in have:
            assert r.specifier.contains(have[name], prereleases=True), (r, have[name])
