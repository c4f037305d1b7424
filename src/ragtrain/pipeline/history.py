"""What a training stage keeps of its run: per-step logs, then its metrics and loss-curve files."""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from ragtrain.io import atomic_write_json
from ragtrain.pipeline.timing import record_timings
from ragtrain.trainer import TrainState

OnStep = Callable[[int, Mapping[str, float]], None]  # a trainer's per-step callback


class TrainingRecord:
    """The ``on_step`` callback of a trainer: forwards every step's logs (to MLflow when the
    stage is tracked); ``finish`` writes the stage's metrics and plot files from the trainer's
    state, whose per-step log a checkpoint carries (a resumed run's curve starts at step 1)."""

    def __init__(self, on_step: OnStep | None = None) -> None:
        self._forward = on_step
        self._t0 = time.perf_counter()

    def __call__(self, step: int, logs: Mapping[str, float]) -> None:
        if self._forward:
            self._forward(step, logs)

    def finish(self, state: TrainState, *, select: str, metrics_file: Path, plot_file: Path,
               timings_file: Path, stage: str,
               extra: Mapping[str, Any] | None = None) -> dict[str, Any]:
        """The stage's metrics (steps, ``extra``, the dev figures of the step best on
        ``select``), written with the loss / lr curve; the training time goes to the timings
        (``<stage>/train_seconds``), not the metrics. Returns the metrics."""
        record_timings(timings_file, {f"{stage}/train_seconds": time.perf_counter() - self._t0})
        metrics: dict[str, Any] = {"train/steps": state.step, **(extra or {})}
        if state.history:
            best = max(state.history, key=lambda h: h[select])
            metrics.update({k: v for k, v in best.items() if k.startswith("dev/")})
            metrics["dev/best_step"] = best["step"]
            if (start := state.history[0])["step"] == 0:  # the starting weights' (eval_at_start)
                metrics.update({f"dev/start/{k[4:]}": v for k, v in start.items()
                                if k.startswith("dev/")})
        atomic_write_json(metrics_file, metrics)
        # the dev evaluations ride on the rows of their steps (the run report's dev curves;
        # DVC plots the loss column)
        dev = {h["step"]: {k: v for k, v in h.items() if k.startswith("dev/")}
               for h in state.history}
        atomic_write_json(plot_file, [{**h, **dev.get(h["step"], {})} for h in state.steps])
        return metrics
