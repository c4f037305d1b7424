"""Malformed requests to the served model: each answered 4xx with a message naming what is wrong,
and good requests answered afterwards. The checks alone (pure functions), the whole HTTP path in
process (MLflow's scoring app around a fake RAG model), and once against a real
``mlflow models serve`` of the tiny project's model (slow: one server for the whole table)."""

from __future__ import annotations

import json
import os
import subprocess
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from ragtrain.errors import RequestError
from ragtrain.generation.questions import (
    MAX_QUESTION_CHARS,
    MAX_QUESTIONS,
    MAX_TOP_K,
    check_questions,
    check_top_k,
    questions_in,
)
from tests.conftest import BIN
from tests.test_serving import QUESTION, project  # noqa: F401  (the module-scoped fixture)
from tests.test_ui import free_port, stop, wait

J = "application/json"


def js(obj: Any) -> bytes:
    return json.dumps(obj).encode()


def ask(*questions: Any, **params: Any) -> bytes:
    return js({"inputs": list(questions), **({"params": params} if params else {})})


def split(*rows: Any, columns: tuple[str, ...] = ("question",)) -> bytes:
    return js({"dataframe_split": {"columns": list(columns), "data": [[r] for r in rows]}})


def nested(depth: int) -> bytes:
    return b'{"inputs": ' + b"[" * depth + b'"a"' + b"]" * depth + b"}"


# (id, request body, content type, HTTP status, a fragment of the message)
BAD_REQUESTS: list[tuple[str, bytes, str, int, str]] = [
    ("null-question", ask(None), J, 400, "question 0 is null"),
    ("number-questions", ask(1, 2), J, 400, "question 0 is a number"),
    ("bool-question", ask(True), J, 400, "question 0 is a boolean"),
    ("object-question", js({"inputs": {"question": {"a": 1}}}), J, 400, "expected a string"),
    ("null-in-list", ask(QUESTION, None), J, 400, "question 1 is null"),
    ("empty-list", ask(), J, 400, "no questions"),
    ("empty-question", ask(""), J, 400, "question 0 is empty or blank"),
    ("blank-question", ask(" \t\n "), J, 400, "question 0 is empty or blank"),
    ("1mb-question", ask("a" * 1_000_000), J, 400, f"at most {MAX_QUESTION_CHARS}"),
    ("too-many-questions", ask(*[QUESTION] * (MAX_QUESTIONS + 1)), J, 400,
     f"at most {MAX_QUESTIONS}"),
    ("nul-character", ask("a\x00b"), J, 400, "NUL character"),
    ("split-null", split(None), J, 400, "question 0 is null"),
    ("split-number", split(7), J, 400, "question 0 is a number"),
    ("split-wrong-column", split("a", columns=("query",)), J, 400, "missing inputs ['question']"),
    ("records-missing-field", js({"dataframe_records": [{"question": "a"}, {"x": 1}]}), J, 400,
     "question 1 is null"),
    ("records-float", js({"dataframe_records": [{"question": 1.5}]}), J, 400,
     "question 0 is a number"),
    ("inputs-wrong-field", js({"inputs": [{"q": "a"}]}), J, 400, "missing inputs ['question']"),
    ("top_k-negative", ask(QUESTION, top_k=-5), J, 400, "top_k: expected an integer from 1"),
    ("top_k-zero", ask(QUESTION, top_k=0), J, 400, "top_k: expected an integer from 1"),
    ("top_k-huge", ask(QUESTION, top_k=100000), J, 400, f"from 1 to {MAX_TOP_K}, got 100000"),
    ("top_k-string", ask(QUESTION, top_k="3"), J, 400, "'top_k'"),
    ("top_k-float", ask(QUESTION, top_k=2.5), J, 400, "'top_k'"),
    ("top_k-list", ask(QUESTION, top_k=[1]), J, 400, "'top_k'"),
    ("params-not-object", js({"inputs": [QUESTION], "params": 3}), J, 400,
     "Parameters must be a dictionary"),
    ("nested-50", nested(50), J, 400, "question 0 is a list"),
    ("non-utf8", b'{"inputs": ["\xff\xfe"]}', J, 400, "UnicodeDecodeError"),
    ("latin1-charset", ask(QUESTION), "application/json; charset=latin-1", 415,
     "only supports UTF-8"),
    ("not-json", b"{inputs: [", J, 400, "valid JSON"),
    ("empty-body", b"", J, 400, "valid JSON"),
    ("json-list", js([QUESTION]), J, 400, "must be a JSON dictionary"),
    ("json-string", js(QUESTION), J, 400, "must be a JSON dictionary"),
    ("no-input-key", js({"question": [QUESTION]}), J, 400, "exactly one of the input fields"),
    ("two-input-keys", js({"inputs": [QUESTION], "instances": [QUESTION]}), J, 400,
     "exactly one of the input fields"),
    ("text-plain", ask(QUESTION), "text/plain", 415, "only supports the following content types"),
    # MLflow's own server fails these two with a bare 500 before the model is called (Python's
    # recursion limit in its JSON decoding; None.split): pyfunc.guard_scoring_server
    ("nested-5000", nested(5000), J, 400, "nested too deeply"),
    ("no-content-type", ask(QUESTION), "", 415, "no Content-Type header"),
    # CSV is refused as a whole: MLflow cannot type a CSV against the Any-typed question column
    # (typed string, a JSON null would be answered as "None"); send JSON
    ("csv", b"question\nWhat?\n", "text/csv", 400, "Failed to parse input as a Pandas"),
]
# A known gap, MLflow's own: params it does not know are dropped (a warning in its log) before
# predict, so they cannot be refused: answered
MLFLOW_GAPS: list[tuple[str, bytes, str, int, str]] = [
    ("unknown-param", ask(QUESTION, bogus=1), J, 200, '"predictions"'),
]
GOOD = ask(QUESTION, top_k=2)


# --- the checks alone --------------------------------------------------------------------------

@pytest.mark.parametrize("values, fragment", [
    ([], "no questions"), ([None], "question 0 is null"), ([float("nan")], "is null"),
    (["ok", 3], "question 1 is a number"), ([["a"]], "is a list"), ([" "], "empty or blank"),
    (["x" * (MAX_QUESTION_CHARS + 1)], f"{MAX_QUESTION_CHARS + 1} characters; at most"),
    (["q"] * (MAX_QUESTIONS + 1), f"{MAX_QUESTIONS + 1} questions in one request"),
])
def test_check_questions_names_what_is_wrong(values: list, fragment: str) -> None:
    with pytest.raises(RequestError, match=None) as e:
        check_questions(values)
    assert fragment in str(e.value) and len(str(e.value)) < 200  # never echoes the input back


def test_check_questions_passes_good_ones_and_takes_limits() -> None:
    assert check_questions(["a?", "x" * MAX_QUESTION_CHARS])[0] == "a?"
    with pytest.raises(RequestError, match="at most 3"):
        check_questions(["abcd"], max_chars=3)


@pytest.mark.parametrize("value, expected", [(None, None), (1, 1), (MAX_TOP_K, MAX_TOP_K)])
def test_check_top_k_accepts(value: Any, expected: Any) -> None:
    assert check_top_k(value) == expected


@pytest.mark.parametrize("value", [0, -5, MAX_TOP_K + 1, 10**20, "3", 2.5, True, [1]])
def test_check_top_k_refuses(value: Any) -> None:
    with pytest.raises(RequestError, match="params.top_k: expected an integer"):
        check_top_k(value)


def test_questions_in_reads_every_input_shape() -> None:
    import numpy as np
    import pandas as pd

    assert questions_in(pd.DataFrame({"question": ["a", "b"]})) == ["a", "b"]
    assert questions_in(pd.DataFrame({"question": [["a", "b"]]})) == ["a", "b"]  # MLflow's row
    assert questions_in({"question": "a"}) == ["a"]
    assert questions_in({"question": np.array(["a", "b"])}) == ["a", "b"]
    assert questions_in(["a", "b"]) == ["a", "b"] and questions_in("a") == ["a"]
    assert questions_in([{"question": "a"}]) == ["a"]
    for bad, fragment in [(pd.DataFrame({"q": ["a"]}), "expected a 'question' column"),
                          (pd.DataFrame({"question": ["a"], "x": [1]}), "unknown column(s)"),
                          ({"question": "a", "top_k": 1}, "unknown field(s) ['top_k']"),
                          ([{"question": "a", "x": 1}], "record 0 has fields")]:
        with pytest.raises(RequestError, match=None) as e:
            questions_in(bad)
        assert fragment in str(e.value)


# --- the HTTP path in process: MLflow's scoring app around a fake model --------------------------

class FakeRAG:
    """Answers every question with "x" from one passage: the request path without a model."""

    @classmethod
    def load(cls, bundle: Path) -> FakeRAG:
        return cls()

    def answer(self, questions: list[str], top_k: int | None = None) -> list[dict]:
        p = {"id": "p1", "title": "t", "text": "x", "score": 1.0}
        return [{"question": q, "answer": "x", "answer_score": 0.0, "answer_passage": "p1",
                 "passages": [p] * (top_k or 1)} for q in questions]


@pytest.fixture(scope="module")
def scoring_app(tmp_path_factory: pytest.TempPathFactory) -> Any:
    import mlflow.pyfunc
    from fastapi.testclient import TestClient
    from mlflow.pyfunc import scoring_server

    from ragtrain.tracking.pyfunc import save_rag_pyfunc

    root = tmp_path_factory.mktemp("fake-model")
    (root / "bundle").mkdir()
    (root / "bundle/weights").write_text("none")
    save_rag_pyfunc(root / "bundle", root / "model", [QUESTION],
                    rag_class=f"{__name__}:FakeRAG")
    app = scoring_server.init(mlflow.pyfunc.load_model(str(root / "model")))
    return TestClient(app, raise_server_exceptions=False)


def check_response(status: int, text: str, want_status: int, fragment: str) -> None:
    assert status == want_status, text[:500]
    assert fragment in text, text[:500]
    assert "unexpected error while evaluating the model" not in text  # MLflow's generic one


@pytest.mark.parametrize("body, ctype, status, fragment",
                         [c[1:] for c in BAD_REQUESTS + MLFLOW_GAPS],
                         ids=[c[0] for c in BAD_REQUESTS + MLFLOW_GAPS])
def test_bad_requests_in_process(scoring_app: Any, body: bytes, ctype: str, status: int,
                                 fragment: str) -> None:
    r = scoring_app.post("/invocations", content=body,
                         headers={"Content-Type": ctype} if ctype else {})
    check_response(r.status_code, r.text, status, fragment)
    good = scoring_app.post("/invocations", content=GOOD, headers={"Content-Type": J})
    assert good.status_code == 200 and len(good.json()["predictions"][0]["passages"]) == 2


def test_the_scoring_server_guard_wraps_once_and_only_what_is_there(
        scoring_app: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    from mlflow.pyfunc import scoring_server

    from ragtrain.tracking.pyfunc import guard_scoring_server

    wrapped = scoring_server.invocations  # the model's load wrapped it
    assert wrapped.guarded
    guard_scoring_server()  # a second model in the process: not wrapped twice
    assert scoring_server.invocations is wrapped
    # an MLflow without one of the functions: left as it is, the model still loads
    monkeypatch.delattr(scoring_server, "_decode_json_input")
    monkeypatch.setattr(scoring_server, "invocations", lambda *a: None)
    guard_scoring_server()
    assert not hasattr(scoring_server.invocations, "guarded")


def test_good_inputs_in_process(scoring_app: Any) -> None:
    for body in (ask("a", "b"), split("a", "b"), js({"inputs": {"question": ["a", "b"]}}),
                 js({"instances": [{"question": "a"}, {"question": "b"}]}),
                 js({"dataframe_records": [{"question": "a"}, {"question": "b"}]})):
        r = scoring_app.post("/invocations", content=body, headers={"Content-Type": J})
        assert r.status_code == 200, r.text
        assert [p["question"] for p in r.json()["predictions"]] == ["a", "b"]
        assert len(r.json()["predictions"][0]["passages"]) == 1  # no top_k: the model's own


# --- once for real: `mlflow models serve` of the tiny project's model ---------------------------

@pytest.fixture(scope="module")
def served_url(project: Path,  # noqa: F811
               tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """One ``mlflow models serve`` of the tiny project's RAG model for the whole table."""
    from ragtrain.tracking.pyfunc import save_rag_pyfunc

    root = tmp_path_factory.mktemp("served")
    save_rag_pyfunc(project / "artifacts/rag", root / "model", [QUESTION])
    port = free_port()
    log = open(root / "serve.log", "w")
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}"}
    server = subprocess.Popen([str(BIN / "mlflow"), "models", "serve", "-m", str(root / "model"),
                               "--env-manager", "local", "-h", "127.0.0.1", "-p", str(port)],
                              env=env, stdout=log, stderr=log)
    url = f"http://127.0.0.1:{port}"
    try:
        wait(lambda: urllib.request.urlopen(f"{url}/ping", timeout=2).status == 200, 120,
             "mlflow models serve")
        yield url
        assert server.poll() is None, "the server died"
    finally:
        stop(server)
        log.close()


def post(url: str, body: bytes, ctype: str) -> tuple[int, str]:
    """POST to /invocations with exactly these headers (urllib would add a form type)."""
    import http.client
    from urllib.parse import urlsplit

    conn = http.client.HTTPConnection(urlsplit(url).netloc, timeout=60)
    try:
        conn.request("POST", "/invocations", body=body,
                     headers={"Content-Type": ctype} if ctype else {})
        r = conn.getresponse()
        return r.status, r.read().decode(errors="replace")
    finally:
        conn.close()


@pytest.mark.slow
@pytest.mark.parametrize("body, ctype, status, fragment",
                         [c[1:] for c in BAD_REQUESTS + MLFLOW_GAPS],
                         ids=[c[0] for c in BAD_REQUESTS + MLFLOW_GAPS])
def test_bad_requests_to_a_real_server(served_url: str, body: bytes, ctype: str, status: int,
                                       fragment: str) -> None:
    check_response(*post(served_url, body, ctype), status, fragment)


@pytest.mark.slow
def test_the_real_server_answers_concurrent_clients(served_url: str) -> None:
    """4 clients at once, 48 requests: all answered. MLflow runs predict in threads; before
    RAGPyfunc's lock the copy generator's decoding raced (about 1 request in 12 failed)."""
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(4) as pool:
        results = list(pool.map(lambda _: post(served_url, GOOD, J), range(48)))
    failed = [r for r in results if r[0] != 200]
    assert not failed, failed[:2]


@pytest.mark.slow
def test_the_real_server_still_answers(served_url: str) -> None:
    for _ in range(2):  # after the whole table of bad requests (this test runs after them)
        status, text = post(served_url, GOOD, J)
        assert status == 200, text
        (a,) = json.loads(text)["predictions"]
        assert a["question"] == QUESTION and a["answer"].strip() and len(a["passages"]) >= 2
