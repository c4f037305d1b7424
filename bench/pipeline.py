"""Per-stage wall time of a pipeline run, in DAG order, so the next slow stage is visible.

    python bench/pipeline.py                         # timings/timings.json of this workspace
    python bench/pipeline.py A/timings/timings.json B/timings/timings.json   # side by side

Every stage run records ``<stage>/wall_seconds`` (and training stages ``train_seconds``,
evaluate ``answers_per_s``) in ``timings/timings.json`` (not DVC metrics: wall times differ
between runs and machines). With two files the table shows both and their ratio (B / A):
compare runs made on the same machine, alone on it.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]


def stage_order() -> list[str]:
    """The stages in dvc.yaml's order (the DAG's declaration order)."""
    return list(yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"])


def table(files: list[Path]) -> str:
    runs = [json.loads(f.read_text()) for f in files]
    keys = {k for r in runs for k in r}
    stages = [s for s in stage_order() if any(k.startswith(f"{s}/") for k in keys)]
    totals = [sum(v for k, v in r.items() if k.endswith("/wall_seconds")) for r in runs]
    head = f"{'stage':18s}" + "".join(f"{'wall s (' + f.parent.parent.name + ')':>24s}"
                                     for f in files)
    head += f"{'share':>8s}" + (f"{'ratio B/A':>11s}" if len(runs) == 2 else "")
    lines = [head]
    for s in stages:
        w = [r.get(f"{s}/wall_seconds") for r in runs]
        row = f"{s:18s}" + "".join(f"{x:24.1f}" if x is not None else f"{'-':>24s}" for x in w)
        row += f"{(w[0] or 0) / totals[0] * 100 if totals[0] else 0:7.1f}%"
        if len(runs) == 2 and w[0] and w[1]:
            row += f"{w[1] / w[0]:11.2f}"
        lines.append(row)
        for k in sorted(k for k in keys if k.startswith(f"{s}/") and
                        not k.endswith("/wall_seconds")):
            lines.append(f"  {k.split('/', 1)[1]:16s}" + "".join(
                f"{r[k]:24.2f}" if k in r else f"{'-':>24s}" for r in runs))
    lines.append(f"{'total':18s}" + "".join(f"{t:24.1f}" for t in totals) + "       " + (
        f"{totals[1] / totals[0]:12.2f}" if len(runs) == 2 and totals[0] else ""))
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    files = [Path(a) for a in argv] or [REPO / "timings/timings.json"]
    missing = [str(f) for f in files if not f.is_file()]
    if missing:
        print(f"error: {', '.join(missing)}: no such file (run `dvc repro` first: every stage "
              "records its wall time there)", file=sys.stderr)
        return 2
    print(table(files))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
