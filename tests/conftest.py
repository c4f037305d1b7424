from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

# Offline and quiet, before anything imports transformers / mlflow / prefect.
for k, v in {
    "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
    "HF_EVALUATE_OFFLINE": "1", "HF_HUB_DISABLE_PROGRESS_BARS": "1", "DVC_NO_ANALYTICS": "1",
    "MLFLOW_DISABLE_TELEMETRY": "true", "DO_NOT_TRACK": "true",
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "TOKENIZERS_PARALLELISM": "false",
}.items():
    os.environ.setdefault(k, v)

REPO = Path(__file__).resolve().parents[1]
FIXTURES = Path(__file__).resolve().parent / "fixtures"
BIN = Path(sys.executable).parent


# Seconds each of the slowest modules took on 2 cores (`.ci/run` with --durations=0, summed per
# module). `make test` hands whole modules to 2 xdist workers in collection order
# (--no-loadscope-reorder): longest first, so that no long module starts last and leaves the
# other worker idle. A module not listed counts as short; the order never changes what runs.
MODULE_SECONDS = {  # measured on 2026-12-06 (stop 35: --durations=0, summed per module)
    "test_flow.py": 163, "test_faults.py": 153, "test_ui.py": 123,
    "test_retrieval_only_e2e.py": 111, "test_store_down.py": 84, "test_prefect_worker.py": 84,
    "test_ddp.py": 83, "test_serving.py": 74, "test_dvc_pipeline.py": 70,
    "test_mlflow_auth.py": 64, "test_ddp_stages.py": 57, "test_postgres_tracking.py": 52,
    "test_stage_declarations.py": 38,  # stop 42, not in that measurement
    "test_error_catalogue.py": 34, "test_concurrent_promote.py": 32, "test_dvc_s3.py": 26,
    "test_retriever_stages.py": 20, "test_registry.py": 19, "test_reranker.py": 16,
}


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Longest modules first (stable: tests keep their order within a module)."""
    items.sort(key=lambda item: -MODULE_SECONDS.get(item.path.name, 0))


def squad_dev_zip() -> Path:
    """The official SQuAD v1.1 dev set beside the checkout (../shared), or $RAGTRAIN_SQUAD_DEV."""
    p = Path(os.environ.get("RAGTRAIN_SQUAD_DEV",
                            REPO.parent / "shared/data/squad-v1.1/dev-v1.1.json.zip"))
    if not p.exists():
        pytest.fail(f"SQuAD v1.1 dev not found at {p}; set RAGTRAIN_SQUAD_DEV")
    return p


@pytest.fixture(scope="session")
def squad_zip() -> Path:
    return squad_dev_zip()


def run_cli(args: list[str], cwd: Path, check: bool = False) -> subprocess.CompletedProcess:
    """Run the real `ragtrain` console script in ``cwd``."""
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}"}
    r = subprocess.run([str(BIN / "ragtrain"), *args], cwd=cwd, env=env, capture_output=True,
                       text=True)
    if check and r.returncode != 0:
        raise AssertionError(f"ragtrain {args} failed:\n{r.stdout}\n{r.stderr}")
    return r


@pytest.fixture(scope="session")
def tiny_bert_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny BERT (random weights, MiniLM's real tokenizer), saved once per session."""
    import torch
    from transformers import AutoTokenizer, BertConfig, BertModel

    from ragtrain.models import resolve_model_path

    torch.manual_seed(0)
    out = tmp_path_factory.mktemp("tiny_bert")
    tok = AutoTokenizer.from_pretrained(resolve_model_path("all-MiniLM-L6-v2"))
    cfg = BertConfig(vocab_size=tok.vocab_size, hidden_size=32, num_hidden_layers=2,
                     num_attention_heads=2, intermediate_size=64, max_position_embeddings=128)
    BertModel(cfg).save_pretrained(out)
    tok.save_pretrained(out)
    return out


# the data and retriever sections every tiny project shares ({source}, {bert} to fill in)
TINY_RETRIEVER_PARAMS = """
data:
  source: {source}
  sha256: ""
retriever:
  model_name: {bert}
  batch_size: 2
  questions_per_passage: 2
  max_steps: 2
  checkpoint_every: 1
  precision: fp32
  top_k: 2
"""

TINY_RAG_PARAMS = TINY_RETRIEVER_PARAMS + """generator:
  model_name: {bert}
  max_source_tokens: 96
  max_answer_tokens: 8
  answer_from: 2  # two inputs of retriever.top_k (2) passages each
  batch_size: 2
  max_steps: 3
  eval_every: 0
  dev_questions: 0
  checkpoint_every: 1
  precision: fp32
  eval_batch_size: 4
evaluation:
  recall_ks: [1, 2, 5]
  rank_cutoff: 3
tracking:
  enabled: {tracked}
  uri: {uri}
registry:
  floor: 0.0
"""


@pytest.fixture()
def tiny_rag_project(tmp_path: Path, tiny_bert_dir: Path, monkeypatch: pytest.MonkeyPatch,
                     request: pytest.FixtureRequest) -> Path:
    """A tiny project (5 passages, tiny BERT retriever and copy generator) with every stage up
    to `package` run through the CLI; MLflow tracking only under @pytest.mark.tracked."""
    from ragtrain import cli

    tracked = request.node.get_closest_marker("tracked") is not None
    (tmp_path / "params.yaml").write_text(TINY_RAG_PARAMS.format(
        source=FIXTURES / "tiny_jsonl", bert=tiny_bert_dir, tracked=str(tracked).lower(),
        uri="sqlite:///mlruns/mlflow.db"))
    monkeypatch.chdir(tmp_path)
    for stage in ("fetch", "prepare", "build-bm25", "train-retriever", "build-index",
                  "retrieve", "train-generator", "evaluate", "package"):
        assert cli.main([stage]) == 0, stage
    return tmp_path


def tamper_safetensors(path: Path) -> None:
    """Shift the first tensor of a saved safetensors file by 1 (weights edited on disk)."""
    from safetensors.torch import load_file, save_file

    sd = load_file(str(path))
    k = next(iter(sd))
    sd[k] = sd[k] + 1
    save_file(sd, str(path), metadata={"format": "pt"})


class RecordingRun:
    """Records what a stage's log function sends to its MLflow run."""

    def __init__(self) -> None:
        self.metrics: dict = {}
        self.dicts: dict = {}
        self.artifacts: list = []

    def log_metrics(self, m: dict, step: int | None = None) -> None:
        self.metrics.update(m)

    def log_dict(self, d: dict, name: str) -> None:
        self.dicts[name] = d

    def log_artifact(self, path: Path, folder: str | None = None) -> None:
        self.artifacts.append((Path(path).name, folder))


class Crash(Exception):
    """Raised by ``crash_at``: a training run killed at a step."""


def crash_at(at: int):  # type: ignore[no-untyped-def]
    """An on_step callback that raises ``Crash`` when step ``at`` is reached."""

    def on_step(step: int, logs: object) -> None:
        if step == at:
            raise Crash

    return on_step


def run_stages(root: Path, stages: list[str] | tuple[str, ...]) -> None:
    """Run the stages' CLI commands in order, in ``root`` (each must exit 0)."""
    from ragtrain import cli

    cwd = os.getcwd()
    os.chdir(root)
    try:
        for stage in stages:
            assert cli.main([stage]) == 0, stage
    finally:
        os.chdir(cwd)
