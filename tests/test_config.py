from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from ragtrain.config import Config, load_config, parse_override, set_params
from ragtrain.errors import ConfigError
from tests.conftest import REPO, run_cli


def write(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "params.yaml"
    p.write_text(text, encoding="utf-8")
    return p


def test_repo_params_load_and_match_defaults() -> None:
    cfg = load_config(REPO / "params.yaml")
    # params.yaml spells out every default (data.source may point at a local copy: make demo)
    assert cfg == dataclasses.replace(
        Config(), data=dataclasses.replace(Config().data, source=cfg.data.source))


def test_empty_file_gives_defaults(tmp_path: Path) -> None:
    assert load_config(write(tmp_path, "")) == Config()


@pytest.mark.parametrize(
    ("text", "needle"),
    [
        ("data:\n  sourse: x\n", "params.data.sourse: unknown key"),
        ("bogus: 1\n", "params.bogus: unknown key"),
        ("retriever:\n  hybrid:\n    rrf: 3\n", "params.retriever.hybrid.rrf: unknown key"),
        ("data:\n  split_seed: '3'\n", "params.data.split_seed: expected an integer, got '3'"),
        ("data:\n  split_seed: 1.5\n", "params.data.split_seed: expected an integer"),
        ("retriever:\n  lr: '1e-4'\n", "params.retriever.lr: expected a number, got '1e-4'"),
        ("data:\n  dedup_passages: yes\n", "params.data.dedup_passages: expected true or false"),
        ("data:\n  test_fraction: 1.5\n", "params.data.test_fraction: must be < 1, got 1.5"),
        ("data:\n  chunk_tokens: -1\n", "params.data.chunk_tokens: must be >= 0, got -1"),
        ("data:\n  format: csv\n", "params.data.format: expected one of"),
        ("data:\n  sha256: abc\n", "params.data.sha256: must match"),
        ("data: 3\n", "params.data: expected a mapping"),
        ("evaluation:\n  recall_ks: [1, x]\n", "params.evaluation.recall_ks[1]: expected an int"),
        ("abstention:\n  null_weights: []\n",
         "params.abstention.null_weights: must hold at least 1 item"),
        ("abstention:\n  null_weights: [0.1, -0.2]\n",
         "params.abstention.null_weights: must be >= 0, got -0.2"),
        ("retriever:\n  temperature: .nan\n", "params.retriever.temperature: expected a finite"),
        ("data:\n  chunk_tokens: 10\n  chunk_overlap: 10\n", "params.data.chunk_overlap"),
        ("data:\n  dev_fraction: 0.5\n  test_fraction: 0.5\n",
         "params.data.dev_fraction + test_fraction"),
        ("data:\n  a: 1\n  a: 2\n", "invalid YAML"),
        ("data: [\n", "invalid YAML"),
    ],
)
def test_bad_values_name_the_key(tmp_path: Path, text: str, needle: str) -> None:
    with pytest.raises(ConfigError) as e:
        load_config(write(tmp_path, text))
    assert needle in str(e.value)
    assert "params.yaml" in str(e.value)


def test_yaml12_floats_match_dvc(tmp_path: Path) -> None:
    # PyYAML would read 1e-4 as a string; DVC (YAML 1.2) as a float. We read it like DVC.
    cfg = load_config(write(tmp_path, "retriever:\n  lr: 1e-4\n  temperature: 1\n"))
    assert cfg.retriever.lr == 1e-4
    assert type(cfg.retriever.temperature) is float and cfg.retriever.temperature == 1.0


def test_overrides(tmp_path: Path) -> None:
    p = write(tmp_path, "data:\n  split_seed: 1\n")
    cfg = load_config(p, dict([parse_override("data.split_seed=3"),
                               parse_override("retriever.hybrid.fusion=weighted")]))
    assert cfg.data.split_seed == 3 and cfg.retriever.hybrid.fusion == "weighted"
    with pytest.raises(ConfigError, match="params.data.nope: unknown key"):
        load_config(p, {"data.nope": 1})


def test_set_params_keeps_comments_and_refuses_bad_values(tmp_path: Path) -> None:
    p = write(tmp_path, "# top comment\ndata:\n  split_seed: 1  # why\n")
    set_params(p, {"data.split_seed": 7, "data.source": "/x/y.zip"})
    text = p.read_text()
    assert "# top comment" in text and "# why" in text
    assert load_config(p).data.split_seed == 7 and load_config(p).data.source == "/x/y.zip"
    before = p.read_text()
    with pytest.raises(ConfigError, match="params.data.test_fraction"):
        set_params(p, {"data.test_fraction": 2.0})
    assert p.read_text() == before


def test_cli_config_show_and_errors(tmp_path: Path) -> None:
    p = write(tmp_path, "data:\n  split_seed: 5\n")
    r = run_cli(["-p", str(p), "config", "show", "--format", "json"], tmp_path, check=True)
    assert '"split_seed": 5' in r.stdout
    r = run_cli(["-p", str(p), "config", "show", "-S", "data.split_seed=x"], tmp_path)
    assert r.returncode == 2 and "params.data.split_seed: expected an integer" in r.stderr
    r = run_cli(["-p", str(tmp_path / "missing.yaml"), "config", "show"], tmp_path)
    assert r.returncode == 2 and "missing.yaml: no such file" in r.stderr
    r = run_cli(["--help"], tmp_path, check=True)
    assert "prepare" in r.stdout and "fetch" in r.stdout


def test_retriever_loss_choices_are_the_registered_losses() -> None:
    # config.py stays torch-free, so it keeps its own Literal; it must name exactly the registry
    import typing

    from ragtrain.config import RetrieverConfig
    from ragtrain.retrieval.losses import LOSSES

    allowed = typing.get_args(typing.get_type_hints(RetrieverConfig)["loss"])
    assert sorted(allowed) == sorted(LOSSES) == ["cosine", "distill", "in_batch_nll"]


def test_a_literal_choice_is_matched_by_type_too() -> None:
    """1 == True in Python; `generator.enabled: 1` is still not `true`."""
    assert load_config_with({"generator.enabled": True}).generator.enabled is True
    for bad in (1, 0, "yes"):
        with pytest.raises(ConfigError, match="generator.enabled: expected one of"):
            load_config_with({"generator.enabled": bad})


def load_config_with(overrides: dict) -> Config:
    return load_config(REPO / "params.yaml", overrides)
