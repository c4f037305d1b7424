"""Serve the flows as deployments, so the Prefect UI can run them (edit parameters, click Run).

    make ui          # a Prefect server on 127.0.0.1:4200 + this script, in the background
    make ui-stop     # stops both

Or by hand: `prefect server start --host 127.0.0.1`, then `python flows/serve.py`. To run the
same deployments on other machines, use a work pool instead of serving (see the README).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

# run from anywhere: the repo root (params.yaml, dvc.yaml) is this file's parent folder
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from prefect import serve  # noqa: E402

from flows.promote import evaluate_champion, promote  # noqa: E402
from flows.rag_pipeline import rag_pipeline  # noqa: E402


def deployments() -> list:
    """The deployments this project serves, with their default parameters."""
    return [
        rag_pipeline.to_deployment(
            name="train-eval",
            parameters={"params_path": str(ROOT / "params.yaml"), "overrides": {},
                        "push": True, "promote": False, "until": "", "nproc_per_node": 0},
            description="Train and evaluate the RAG pipeline (the dvc.yaml stages, through "
                        "DVC). overrides: params.yaml keys, e.g. {\"retriever.lr\": 1.0e-4}; "
                        "until: the stage to stop after (with what it needs), empty: all; "
                        "nproc_per_node > 1: training stages under torchrun (DDP).",
            tags=["ragtrain"],
        ),
        promote.to_deployment(
            name="promote",
            parameters={"params_path": str(ROOT / "params.yaml"), "version": ""},
            description="Make the registered challenger (or `version`) the champion if it "
                        "beats it on registry.primary_metric; refused (failed run) otherwise.",
            tags=["ragtrain", "registry"],
        ),
        evaluate_champion.to_deployment(
            name="evaluate-champion",
            parameters={"params_path": str(ROOT / "params.yaml"),
                        "questions": "data/prepared/test.jsonl", "split": "test",
                        "record": True},
            description="Re-score the champion on a JSONL question file (question + answers).",
            tags=["ragtrain", "registry"],
        ),
    ]


if __name__ == "__main__":
    os.chdir(ROOT)
    serve(*deployments())
