"""Checks on what a caller asks the RAG model: the questions and ``top_k``.

Pure functions (no MLflow, no model): the served pyfunc runs them before answering and turns a
``RequestError`` into an HTTP 400 whose message names the field and what it expects. The limits
below are the served model's documented limits (README, "Serving").
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

from ragtrain.errors import RequestError

# SQuAD questions are under 300 characters; readers truncate at 512 tokens anyway. A longer
# "question" is a mistake or an attack, refused before the encoder sees it.
MAX_QUESTION_CHARS = 1000
MAX_QUESTIONS = 64  # per request: one request must not hold the server for minutes
MAX_TOP_K = 100  # passages per question handed to the generator
COLUMN = "question"


def _show(value: Any, limit: int = 60) -> str:
    """A short repr for messages: never echo a megabyte back."""
    text = repr(value)
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text)} characters)"


def _type_name(value: Any) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "null"
    return {bool: "a boolean", int: "a number", float: "a number", list: "a list",
            tuple: "a list", dict: "an object"}.get(type(value), type(value).__name__)


def check_questions(values: Sequence[Any], *, max_questions: int = MAX_QUESTIONS,
                    max_chars: int = MAX_QUESTION_CHARS) -> list[str]:
    """The questions, each a non-blank string of at most ``max_chars`` characters."""
    if len(values) == 0:
        raise RequestError(f"input: no questions; send at least one '{COLUMN}' string")
    if len(values) > max_questions:
        raise RequestError(f"input: {len(values)} questions in one request; at most "
                           f"{max_questions}")
    out = []
    for i, q in enumerate(values):
        if not isinstance(q, str):
            raise RequestError(f"input: question {i} is {_type_name(q)} ({_show(q)}); "
                               "expected a string")
        if not q.strip():
            raise RequestError(f"input: question {i} is empty or blank ({_show(q)}); "
                               "expected a non-blank string")
        if len(q) > max_chars:
            raise RequestError(f"input: question {i} has {len(q)} characters; at most "
                               f"{max_chars}")
        if "\x00" in q:
            raise RequestError(f"input: question {i} contains a NUL character")
        out.append(str(q))
    return out


def _is_list(value: Any) -> bool:
    return isinstance(value, (list, tuple)) or getattr(value, "ndim", 0) >= 1


def _listed(value: Any) -> list[Any]:
    """A column's values as a plain list (numpy arrays and pandas Series via tolist)."""
    if hasattr(value, "tolist"):
        value = value.tolist()
    if isinstance(value, str) or not isinstance(value, (list, tuple)):
        return [value]
    return list(value)


def questions_in(model_input: Any, **limits: int) -> list[str]:
    """The questions in a request: a DataFrame / mapping with only a ``question`` column, a list
    of strings, a list of ``{"question": ...}`` records, or one string; checked as above."""
    if hasattr(model_input, "columns"):  # pandas DataFrame
        columns = [str(c) for c in model_input.columns]
        if COLUMN not in columns:
            raise RequestError(f"input: expected a '{COLUMN}' column, got columns {columns}")
        if extra := [c for c in columns if c != COLUMN]:
            raise RequestError(f"input: unknown column(s) {extra}; expected only '{COLUMN}'")
        values = model_input[COLUMN].tolist()
        if len(values) == 1 and _is_list(values[0]):
            # MLflow hands {"inputs": [q1, q2]} over as one row holding the whole list
            values = _listed(values[0])
        return check_questions(values, **limits)
    if isinstance(model_input, Mapping):
        keys = [str(k) for k in model_input]
        if COLUMN not in keys:
            raise RequestError(f"input: expected a '{COLUMN}' field, got {keys}")
        if extra := [k for k in keys if k != COLUMN]:
            raise RequestError(f"input: unknown field(s) {extra}; expected only '{COLUMN}'")
        return check_questions(_listed(model_input[COLUMN]), **limits)
    values = _listed(model_input)
    if values and all(isinstance(v, Mapping) for v in values):  # records
        for i, v in enumerate(values):
            if set(v) != {COLUMN}:
                raise RequestError(f"input: record {i} has fields {sorted(map(str, v))}; "
                                   f"expected only '{COLUMN}'")
        # MLflow hands each value over as a numpy array (0-d for a single string)
        values = [v[COLUMN].tolist() if hasattr(v[COLUMN], "tolist") else v[COLUMN]
                  for v in values]
    return check_questions(values, **limits)


def check_top_k(value: Any, *, max_top_k: int = MAX_TOP_K) -> int | None:
    """``top_k`` as an int in [1, max_top_k], or None (not sent: the model's own top_k)."""
    if value is None:
        return None
    if hasattr(value, "item") and not isinstance(value, (list, tuple)):  # numpy scalar
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, int):
        raise RequestError(f"params.top_k: expected an integer, got {_type_name(value)} "
                           f"({_show(value)})")
    if not 1 <= value <= max_top_k:
        raise RequestError(f"params.top_k: expected an integer from 1 to {max_top_k}, "
                           f"got {value}")
    return value
