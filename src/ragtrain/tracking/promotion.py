"""The promotion rule, pure (no mlflow): does a new model beat the champion on one metric?"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass


@dataclass(frozen=True)
class Decision:
    """Whether to promote a model, and a sentence that says why, with both values."""

    promote: bool
    reason: str


def should_promote(
    new: Mapping[str, float],
    current: Mapping[str, float] | None,
    *,
    metric: str,
    min_gain: float = 0.0,
    greater_is_better: bool = True,
    floor: float | None = None,
) -> Decision:
    """Promote ``new`` over the champion ``current`` only on a gain strictly above ``min_gain``.

    No champion: promote if ``new`` meets ``floor`` (or no floor). The floor also applies when
    there is a champion, so a model below it is never promoted. Missing or NaN values refuse.
    """
    if not (math.isfinite(min_gain) and min_gain >= 0):
        raise ValueError(f"min_gain: must be a finite number >= 0, got {min_gain!r}")
    direction = "higher" if greater_is_better else "lower"
    nv = new.get(metric)
    if nv is None or math.isnan(nv):
        return Decision(False, f"refused: the new model has no {metric} value; cannot judge it")
    if floor is not None:
        below = nv < floor if greater_is_better else nv > floor
        if below:
            return Decision(
                False,
                f"refused: new {metric} = {nv:.6g} does not meet the floor {floor:.6g} "
                f"({direction} is better)",
            )
    if current is None:
        meets = "" if floor is None else f", which meets the floor {floor:.6g}"
        return Decision(
            True, f"promoted: no current champion; new {metric} = {nv:.6g}{meets}"
        )
    cv = current.get(metric)
    if cv is None or math.isnan(cv):
        return Decision(
            False,
            f"refused: the current champion has no {metric} value (new = {nv:.6g}); "
            "cannot compare",
        )
    gain = (nv - cv) if greater_is_better else (cv - nv)
    detail = (
        f"new {metric} = {nv:.6g} vs champion {cv:.6g} ({direction} is better): "
        f"gain {gain:+.6g}, needs > {min_gain:.6g}"
    )
    if gain > min_gain:
        return Decision(True, f"promoted: {detail}")
    return Decision(False, f"refused: {detail}")
