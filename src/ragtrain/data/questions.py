"""Question files given to a trained model: for `ask`/`predict`, and scored ones (with answers)
for `evaluate-champion`. Every line is checked before any work, and a bad one is named."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ragtrain.errors import DataError


def read_questions(path: Path, *, need_answers: bool = False) -> list[dict[str, Any]]:
    """The questions of a file, as rows with an ``"id"`` and a ``"question"``.

    Without ``need_answers``: a .jsonl file of ``{"question", optional "id"}`` (or BEIR's
    queries.jsonl, ``{"_id", "text"}``) or a text file, one question per line (ids are line
    numbers). With it: a JSONL file (any suffix) of
    ``{"question": str, "answers": [str, ...]}``, what `prepare` writes in
    data/prepared/{dev,test}.jsonl; its rows are returned whole.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: no such file")
    data = path.read_bytes()
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line_no = data[: e.start].count(b"\n") + 1
        raise DataError(f"{path}:{line_no}: not UTF-8 text (byte 0x{data[e.start]:02x} at "
                        f"offset {e.start})") from None
    rows: list[dict[str, Any]] = []
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        if not need_answers and path.suffix != ".jsonl":
            rows.append({"id": str(n), "question": line.strip()})
            continue
        try:
            r = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}:{n}: not JSON ({e.msg})") from None
        q = r.get("question") if isinstance(r, dict) else None
        beir = not need_answers and q is None and isinstance(r, dict) and "_id" in r
        if beir:  # a BEIR queries.jsonl line: {"_id", "text"}
            q = r.get("text")
        if not isinstance(q, str) or not q.strip():
            raise DataError(f"{path}:{n}: needs a non-empty string "
                            + ("\"text\" (a BEIR query)" if beir else "\"question\""))
        if not need_answers:
            rows.append({"id": str(r["_id"] if beir else r.get("id", n)), "question": q})
            continue
        a = r.get("answers")
        if not isinstance(a, list) or not a or not all(isinstance(x, str) for x in a):
            raise DataError(f"{path}:{n}: needs \"answers\", a non-empty list of strings")
        rows.append(r)
    if not rows:
        raise DataError(f"{path}: no questions")
    return rows


def has_answer(row: dict[str, Any]) -> bool:
    """Whether a prepared question has a reference answer (BEIR queries have none)."""
    a = row.get("answers")
    return isinstance(a, list) and any(isinstance(x, str) and x.strip() for x in a)


def answered(rows: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], int]:
    """(the questions with a reference answer, in order; how many were left out)."""
    kept = [r for r in rows if has_answer(r)]
    return kept, len(rows) - len(kept)
