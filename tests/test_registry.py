"""registry.py against a real MLflow sqlite store under tmp: register, promote, rollback.

The bundles here are stand-ins (a manifest and a file): nothing loads them, promotion only
reads the versions' tags. tests/test_serving.py registers and serves a real tiny RAG model.
"""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import pytest

from ragtrain import cli, tracking
from ragtrain.config import RegistryConfig, TrackingConfig
from ragtrain.errors import RegistryError, TrackingError
from ragtrain.tracking import registry

EVAL_A, EVAL_B = "a" * 64, "b" * 64
_names = itertools.count()


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> tuple[TrackingConfig, Path]:
    """One sqlite store per module (MLflow migrates a new database once, which takes seconds)."""
    root = tmp_path_factory.mktemp("repo")
    return TrackingConfig(uri=f"sqlite:///{root}/mlruns/mlflow.db", experiment="tests"), root


@pytest.fixture()
def rcfg() -> RegistryConfig:
    """A fresh model name per test: the tests share the store, not the registered models."""
    return RegistryConfig(model_name=f"rag-{next(_names)}", floor=10.0)


def register(store: tuple[TrackingConfig, Path], rcfg: RegistryConfig, tmp_path: Path,
             f1: float | None, *, eval_set: str = EVAL_A, encoder: str = "e1",
             index_encoder: str | None = None) -> registry.Registered:
    tcfg, root = store
    d = tmp_path / f"bundle{next(_names)}"
    for sub in ("rag", "encoder", "generator"):
        (d / sub).mkdir(parents=True)
        (d / sub / "weights.safetensors").write_bytes(b"\x00" * 8)
    manifest = {"eval_set_sha256": eval_set, "encoder_fingerprint": encoder,
                "index_encoder_fingerprint": index_encoder or encoder, "corpus_sha256": "c"}
    metrics = {"test/em": 1.0} if f1 is None else {"test/f1": f1, "test/em": f1 / 2}
    with tracking.run(tcfg, "register", root=root) as run:
        return registry.register(
            run, rcfg, tcfg, bundle=d / "rag", manifest=manifest, metrics=metrics,
            components={"retriever": [d / "encoder"], "generator": [d / "generator"]},
            example_questions=["Where is Paris?"], root=root)


def alias(store, name: str, a: str) -> str | None:
    tcfg, root = store
    return tracking.get_alias(tcfg, name, a, root=root)


def tags(store, name: str, version: str) -> dict[str, str]:
    tcfg, root = store
    return tracking.version_tags(tcfg, name, version, root=root)


def promote(store, rcfg: RegistryConfig) -> registry.Promotion:
    tcfg, root = store
    return registry.promote(rcfg, tcfg, root=root)


def test_register_tags_the_versions_and_sets_challenger(store, rcfg, tmp_path: Path) -> None:
    r = register(store, rcfg, tmp_path, 40.0)
    assert (r.version, r.components) == ("1", {"retriever": "1", "generator": "1"})
    name = rcfg.model_name
    assert alias(store, name, "challenger") == "1"
    assert alias(store, f"{name}-retriever", "challenger") == "1"
    assert alias(store, f"{name}-generator", "challenger") == "1"
    t = tags(store, name, "1")
    assert float(t["metric.test/f1"]) == 40.0 and float(t["metric.test/em"]) == 20.0
    assert t["ragtrain.eval_set_sha256"] == EVAL_A
    assert t["ragtrain.encoder_fingerprint"] == t["ragtrain.index_encoder_fingerprint"] == "e1"
    assert t["ragtrain.retriever_version"] == "1" and t["ragtrain.generator_version"] == "1"
    assert tags(store, f"{name}-retriever", "1")["ragtrain.encoder_fingerprint"] == "e1"
    tcfg, root = store
    mc = tracking.client(tcfg.uri, root)
    mv = mc.get_model_version(name, "1")
    arts = {a.path for a in mc.list_artifacts(mv.run_id)}
    assert {"rag", "retriever", "generator", "rag_manifest.json"} <= arts
    model = {a.path for a in mc.list_artifacts(mv.run_id, "rag")}
    assert {"rag/MLmodel", "rag/rag_model.py", "rag/artifacts"} <= model
    assert not any(p.endswith(".pkl") for p in model)  # saved from code: nothing pickled


def test_first_model_meets_floor_then_better_wins_worse_and_tie_lose(store, rcfg,
                                                                     tmp_path: Path) -> None:
    name = rcfg.model_name
    register(store, rcfg, tmp_path, 40.0)
    p = promote(store, rcfg)
    assert p.promoted and p.champion is None and "no current champion" in p.decision.reason
    assert alias(store, name, "champion") == "1"
    assert alias(store, name, "challenger") is None  # consumed by the promotion
    assert alias(store, f"{name}-retriever", "champion") == "1"

    register(store, rcfg, tmp_path, 45.0)  # better: promoted
    p = promote(store, rcfg)
    assert p.promoted and (p.challenger, p.champion, p.winner) == ("2", "1", "2")
    assert alias(store, name, "champion") == "2"
    assert alias(store, f"{name}-generator", "champion") == "2"
    for v in ("1", "2"):  # the decision is on both versions
        t = tags(store, name, v)
        assert t["ragtrain.promotion.decision"] == "promoted"
        assert t["ragtrain.promotion.winner"] == "2"
        assert float(t["ragtrain.promotion.challenger_value"]) == 45.0
        assert float(t["ragtrain.promotion.champion_value"]) == 40.0
        assert "gain +5" in t["ragtrain.promotion.reason"]
    assert tags(store, name, "2")["ragtrain.previous_champion"] == "1"

    register(store, rcfg, tmp_path, 30.0)  # worse: refused
    p = promote(store, rcfg)
    assert not p.promoted and p.winner == "2" and "refused" in p.decision.reason
    assert alias(store, name, "champion") == "2"
    assert alias(store, name, "challenger") == "3"  # stays: the record of what was tried
    assert tags(store, name, "3")["ragtrain.promotion.decision"] == "refused"
    assert tags(store, name, "2")["ragtrain.promotion.challenger"] == "3"

    register(store, rcfg, tmp_path, 45.0)  # a tie: refused (the gain must be > min_gain)
    p = promote(store, rcfg)
    assert not p.promoted and "gain +0" in p.decision.reason
    assert alias(store, name, "champion") == "2"


def test_min_gain(store, tmp_path: Path) -> None:
    rcfg = RegistryConfig(model_name=f"rag-{next(_names)}", floor=0.0, min_gain=2.0)
    register(store, rcfg, tmp_path, 40.0)
    assert promote(store, rcfg).promoted
    register(store, rcfg, tmp_path, 41.0)
    p = promote(store, rcfg)
    assert not p.promoted and "needs > 2" in p.decision.reason
    register(store, rcfg, tmp_path, 42.5)
    assert promote(store, rcfg).promoted


def test_first_model_below_the_floor_is_refused(store, rcfg, tmp_path: Path) -> None:
    register(store, rcfg, tmp_path, 5.0)
    p = promote(store, rcfg)
    assert not p.promoted and "floor 10" in p.decision.reason
    assert alias(store, rcfg.model_name, "champion") is None


def test_missing_metric_is_refused(store, tmp_path: Path) -> None:
    rcfg = RegistryConfig(model_name=f"rag-{next(_names)}", floor=0.0)
    register(store, rcfg, tmp_path, 40.0)
    promote(store, rcfg)
    register(store, rcfg, tmp_path, 50.0)
    other = RegistryConfig(model_name=rcfg.model_name, primary_metric="test/accuracy")
    p = promote(store, other)
    assert not p.promoted and "new model has no test/accuracy" in p.decision.reason
    with pytest.raises(RegistryError, match="'test/f1' is not among the metrics"):
        register(store, rcfg, tmp_path, None)


def test_different_evaluation_sets_are_refused(store, rcfg, tmp_path: Path) -> None:
    register(store, rcfg, tmp_path, 40.0, eval_set=EVAL_A)
    promote(store, rcfg)
    register(store, rcfg, tmp_path, 90.0, eval_set=EVAL_B)
    p = promote(store, rcfg)
    assert not p.promoted
    assert "different evaluation sets" in p.decision.reason and "bbbbbbbbbbbb" in p.decision.reason
    assert alias(store, rcfg.model_name, "champion") == "1"


def test_index_from_another_encoder_is_refused(store, rcfg, tmp_path: Path) -> None:
    register(store, rcfg, tmp_path, 90.0, encoder="e1", index_encoder="e0")
    p = promote(store, rcfg)
    assert not p.promoted
    assert "index was built by encoder e0" in p.decision.reason and "e1" in p.decision.reason
    assert alias(store, rcfg.model_name, "champion") is None


def test_rollback_returns_to_the_previous_champion(store, rcfg, tmp_path: Path) -> None:
    tcfg, root = store
    name = rcfg.model_name
    with pytest.raises(RegistryError, match="nothing to roll back"):
        registry.rollback(rcfg, tcfg, root=root)
    for f1 in (40.0, 45.0, 50.0):
        register(store, rcfg, tmp_path, f1)
        assert promote(store, rcfg).promoted
    assert alias(store, name, "champion") == "3"
    r = registry.rollback(rcfg, tcfg, root=root)
    assert (r.replaced, r.champion) == ("3", "2")
    assert alias(store, name, "champion") == "2"
    assert alias(store, f"{name}-retriever", "champion") == "2"
    assert "replaced by version 2" in tags(store, name, "3")["ragtrain.rolled_back"]
    assert registry.rollback(rcfg, tcfg, root=root).champion == "1"
    with pytest.raises(RegistryError, match="version 1 was the first champion"):
        registry.rollback(rcfg, tcfg, root=root)
    with pytest.raises(RegistryError, match="already the champion"):
        registry.promote(rcfg, tcfg, root=root, version="1")


@pytest.mark.parametrize("dies_at", [1, 2, 3, 4, 5, 6])
def test_rollback_again_finishes_an_interrupted_rollback(store, rcfg, tmp_path: Path,
                                                         monkeypatch: pytest.MonkeyPatch,
                                                         dies_at: int) -> None:
    """A rollback (3 -> 2) killed at its n-th registry write (1: its start mark on version 2;
    2-4: the RAG model's alias, then its components'; 5: version 3's rolled-back tag; 6: the end
    mark) is finished by the next
    rollback, which does not go on to version 1; then rollbacks go on as before."""
    tcfg, root = store
    name = rcfg.model_name
    for f1 in (40.0, 45.0, 50.0):
        register(store, rcfg, tmp_path, f1)
        assert promote(store, rcfg).promoted
    writes: list[str] = []

    def counted(real):  # type: ignore[no-untyped-def]
        def call(*a, **k):  # type: ignore[no-untyped-def]
            writes.append(real.__name__)
            if len(writes) == dies_at:
                raise KeyboardInterrupt  # a kill before this write
            return real(*a, **k)
        return call

    for f in ("set_alias", "tag_version"):
        monkeypatch.setattr(tracking, f, counted(getattr(tracking, f)))
    with pytest.raises(KeyboardInterrupt):
        registry.rollback(rcfg, tcfg, root=root)
    monkeypatch.undo()
    assert writes == ["tag_version", *["set_alias"] * 3, *["tag_version"] * 2][:dies_at]
    r = registry.rollback(rcfg, tcfg, root=root)
    assert (r.replaced, r.champion) == ("3", "2")
    assert r.finished == (dies_at > 2)  # from the first alias move on, it was under way
    for n in (name, f"{name}-retriever", f"{name}-generator"):
        assert alias(store, n, "champion") == "2"
    assert "replaced by version 2" in tags(store, name, "3")["ragtrain.rolled_back"]
    assert not tags(store, name, "2").get(registry.ROLLBACK_TAG)
    assert registry.rollback(rcfg, tcfg, root=root).champion == "1"  # and on, as before


def test_promote_again_finishes_an_interrupted_promotion(store, rcfg, tmp_path: Path,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """A promotion that died after moving the RAG model's @champion (before its components'
    and before removing @challenger) is finished by the next promote; a whole one is not redone."""
    name = rcfg.model_name
    register(store, rcfg, tmp_path, 40.0)
    promote(store, rcfg)
    register(store, rcfg, tmp_path, 50.0)
    real, calls = tracking.set_alias, []

    def dies_after_the_first(*a, **k) -> None:
        calls.append(a)
        if len(calls) > 1:
            raise KeyboardInterrupt  # what a kill between the two alias moves leaves
        real(*a, **k)

    monkeypatch.setattr(tracking, "set_alias", dies_after_the_first)
    with pytest.raises(KeyboardInterrupt):
        promote(store, rcfg)
    monkeypatch.setattr(tracking, "set_alias", real)
    assert alias(store, name, "champion") == "2" and alias(store, name, "challenger") == "2"
    assert alias(store, f"{name}-retriever", "champion") == "1"  # left behind by the kill

    p = promote(store, rcfg)
    assert p.promoted and "finished the interrupted promotion of version 2" in p.decision.reason
    assert (p.challenger, p.champion) == ("2", "1")  # the champion it replaced, for rollback
    for n in (name, f"{name}-retriever", f"{name}-generator"):
        assert alias(store, n, "champion") == "2" and alias(store, n, "challenger") is None
    with pytest.raises(RegistryError, match="nothing to promote|no .*@challenger"):
        promote(store, rcfg)  # finished: nothing left to do
    tcfg, root = store
    with pytest.raises(RegistryError, match="version 2 is already the champion"):
        registry.promote(rcfg, tcfg, root=root, version="2")


def test_failed_registration_leaves_no_version(store, rcfg, tmp_path: Path,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    tcfg, root = store
    name = rcfg.model_name
    register(store, rcfg, tmp_path, 40.0)  # version 1 is the challenger
    real = tracking.set_alias

    def fail_on_rag(cfg, n, a, version, **kw):  # the last step of a registration
        if n == name:
            raise TrackingError("registry down")
        return real(cfg, n, a, version, **kw)

    monkeypatch.setattr(tracking, "set_alias", fail_on_rag)
    with pytest.raises(TrackingError, match="registry down"):
        register(store, rcfg, tmp_path, 50.0)
    monkeypatch.undo()
    mc = tracking.client(tcfg.uri, root)
    for n in (name, f"{name}-retriever", f"{name}-generator"):
        assert [str(v.version) for v in mc.search_model_versions(f"name = '{n}'")] == ["1"]
        assert alias(store, n, "challenger") == "1"  # restored
    failed = [r for r in mc.search_runs([mc.get_experiment_by_name("tests").experiment_id])
              if r.info.status == "FAILED"]
    assert failed  # the run that tried is marked FAILED


def write_params(root: Path, tcfg: TrackingConfig, rcfg: RegistryConfig) -> Path:
    p = root / "params.yaml"
    p.write_text(f"tracking:\n  uri: {tcfg.uri}\n  experiment: tests\nregistry:\n"
                 f"  model_name: {rcfg.model_name}\n  floor: {rcfg.floor}\n")
    return p


def test_cli_promote_and_rollback(store, rcfg, tmp_path: Path,
                                  capsys: pytest.CaptureFixture) -> None:
    tcfg, _ = store
    params = str(write_params(tmp_path, tcfg, rcfg))
    assert cli.main(["-p", params, "promote"]) == 2
    assert "no rag-" in capsys.readouterr().err
    register(store, rcfg, tmp_path, 40.0)
    assert cli.main(["-p", params, "promote"]) == 0
    assert "version 1 is now the champion" in capsys.readouterr().out
    register(store, rcfg, tmp_path, 20.0)
    assert cli.main(["-p", params, "promote"]) == 2
    out, err = capsys.readouterr()
    assert "version 2 was not promoted; the champion stays version 1" in out
    assert "new test/f1 = 20 vs champion 40" in out and "promotion refused" in err
    register(store, rcfg, tmp_path, 60.0)
    assert cli.main(["-p", params, "promote"]) == 0
    capsys.readouterr()
    assert cli.main(["-p", params, "rollback"]) == 0
    assert "version 3 -> version 1 (rolled back)" in capsys.readouterr().out
    assert cli.main(["-p", params, "rollback"]) == 2
    assert "first champion" in capsys.readouterr().err


def test_registry_config_is_validated(tmp_path: Path) -> None:
    from ragtrain.config import load_config
    from ragtrain.errors import ConfigError

    p = tmp_path / "params.yaml"
    for text, key in (("registry:\n  model_name: a/b\n", "params.registry.model_name"),
                      ("registry:\n  min_gain: -1.0\n", "params.registry.min_gain"),
                      ("registry:\n  primary_metric: test/f1@5\n",
                       "params.registry.primary_metric"),
                      ("registry:\n  nope: 1\n", "params.registry.nope")):
        p.write_text(text)
        with pytest.raises(ConfigError, match=key):
            load_config(p)
    p.write_text(json.dumps({"registry": {"min_gain": 0.5}}))
    assert load_config(p).registry.min_gain == 0.5
