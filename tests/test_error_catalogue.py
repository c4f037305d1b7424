"""One error catalogue: every bad input ragtrain answers, as one table.

Each row is an input a user can get wrong (a data file, params.yaml, a CLI call, the registry, a
request to the served model), how to produce it, the fragment of the one-line message that must
name the file:line or the key, the exit status (2) or the HTTP status / exception for library-level
rows, and a check that nothing was written: the project folder is hashed before and after the
failing call and must be unchanged (no partial output, no temp file left).

CLI rows run the real ``ragtrain`` console script in tiny temporary projects; registry rows call
the same entry point (``ragtrain.cli:main``) in process, so MLflow is imported once; serving rows
call the pure request checks the served pyfunc runs (``generation/questions.py``), which the
server answers with HTTP 400 and the same message (tests/test_serving_input.py).

``docs/errors.md`` is generated from this table and a test checks it is up to date:

    .venv/bin/python tests/test_error_catalogue.py --write docs/errors.md
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import shutil
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

if __name__ == "__main__":  # run as a script: make the `tests` package importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import pytest  # noqa: E402

from tests.conftest import FIXTURES, REPO, run_cli  # noqa: E402

DOCS = REPO / "docs/errors.md"

# ----------------------------------------------------------------------------- inputs

TINY = FIXTURES / "tiny_jsonl"
GOOD_Q = '{"id": "q1", "question": "Capital of France?", "answers": ["Paris"]}\n'
GOOD_C = '{"id": "d1", "text": "Paris is in France."}\n{"id": "d2", "text": "Rome is in Italy."}\n'


def squad(n_articles: int = 6) -> dict:
    """A small SQuAD v1.1 file: one paragraph and two questions per article, true offsets."""
    data = []
    for i in range(n_articles):
        ctx = f"Article {i} says the color is blue{i} and the number is {i}."
        qas = [{"id": f"q{i}{s}", "question": q, "answers": [{"text": a,
                                                                "answer_start": ctx.find(a)}]}
               for s, q, a in (("a", f"What color in {i}?", f"blue{i}"),
                               ("b", f"What number in {i}?", f"{i}"))]
        data.append({"title": f"Art{i}", "paragraphs": [{"context": ctx, "qas": qas}]})
    return {"version": "1.1", "data": data}


def params_for(proj: Path, source: str, extra: str = "") -> None:
    (proj / "params.yaml").write_text(
        f"data:\n  source: {json.dumps(source)}\n  sha256: \"\"\n{extra}"
        "tracking:\n  enabled: false\n")


def source_file(name: str, content: bytes | str | Callable[[], bytes | str],
                extra: str = "") -> Callable[[Path], None]:
    """A project whose data.source is one file ``in/<name>``."""
    def make(proj: Path) -> None:
        p = proj / "in" / name
        p.parent.mkdir(parents=True, exist_ok=True)
        c = content() if callable(content) else content
        p.write_bytes(c.encode() if isinstance(c, str) else c)
        params_for(proj, str(p), extra)
    return make


def squad_with(edit: Callable[[dict], Any]) -> Callable[[Path], None]:
    def content() -> str:
        d = squad()
        edit(d)
        return json.dumps(d)
    return source_file("dev.json", content)


def qa0(d: dict) -> dict:
    return d["data"][0]["paragraphs"][0]["qas"][0]


def jsonl_pair(corpus: str | bytes | None = None, qa: str | bytes | None = None
               ) -> Callable[[Path], None]:
    """A project whose data.source is a folder with corpus.jsonl and qa.jsonl."""
    def make(proj: Path) -> None:
        d = proj / "in" / "pair"
        d.mkdir(parents=True)
        for name, text in (("corpus.jsonl", corpus), ("qa.jsonl", qa)):
            text = (TINY / name).read_text() if text is None else text
            (d / name).write_bytes(text.encode() if isinstance(text, str) else text)
        params_for(proj, str(d))
    return make


def beir(qrels: str | None = None, queries: str | None = None) -> Callable[[Path], None]:
    """A project whose data.source is a BEIR folder (corpus, queries, qrels/test.tsv)."""
    def make(proj: Path) -> None:
        d = proj / "in" / "beir"
        shutil.copytree(FIXTURES / "tiny_beir", d)
        if qrels is not None:
            (d / "qrels/test.tsv").write_text(qrels)
        if queries is not None:
            (d / "queries.jsonl").write_text(queries)
        params_for(proj, str(d))
    return make


def with_sha(sha: str) -> Callable[[Path], None]:
    """A good SQuAD source pinned to the wrong sha256."""
    def make(proj: Path) -> None:
        source_file("dev.json", json.dumps(squad()))(proj)
        p = proj / "params.yaml"
        p.write_text(p.read_text().replace('sha256: ""', f"sha256: '{sha}'"))
    return make


def zip_source(member: tuple[str, bytes, int | None]) -> Callable[[Path], None]:
    """A .zip source holding a good SQuAD file and ``member`` (name, body, unix mode), written
    as given: a crafted archive."""
    import zipfile

    def content() -> bytes:
        buf = io.BytesIO()
        with zipfile.ZipFile(buf, "w") as z:
            z.writestr("dev.json", json.dumps(squad()))
            info = zipfile.ZipInfo(member[0])
            if member[2] is not None:
                info.external_attr = member[2] << 16
            z.writestr(info, member[1])
        return buf.getvalue()
    return source_file("dev.json.zip", content)


def folder_with_link(proj: Path) -> None:
    """A corpus.jsonl + qa.jsonl folder source with a symbolic link to a file outside it."""
    jsonl_pair()(proj)
    (proj / "secret.txt").write_text("hunter2\n")
    (proj / "in/pair/extra.jsonl").symlink_to(proj / "secret.txt")


def files(**named: str | bytes) -> Callable[[Path], None]:
    """Write files into the (already prepared) project: ``bad_yaml=...`` -> bad.yaml."""
    def make(proj: Path) -> None:
        for name, text in named.items():
            p = proj / name.replace("_yaml", ".yaml").replace("_jsonl", ".jsonl")
            p.write_bytes(text.encode() if isinstance(text, str) else text)
    return make


def bad_params(text: str | bytes) -> Callable[[Path], None]:
    return files(bad_yaml=text)


def nothing(proj: Path) -> None:
    return None


# ----------------------------------------------------------------------------- the table


@dataclass(frozen=True)
class Case:
    id: str
    area: str  # data | params | cli | registry | serving
    input: str  # what is wrong, as a user would make it (for docs/errors.md)
    expect: str  # a fragment of the message: names the file:line or the key
    code: int | str = 2  # exit status, or "HTTP 400 (RequestError)" for library-level rows
    make: Callable[[Path], None] = nothing  # writes the bad input into the project folder
    argv: tuple[str, ...] = ("prepare",)  # the call that must fail
    pre: tuple[tuple[str, ...], ...] = (("fetch",),)  # calls that must succeed first
    project: str = "own"  # own: a fresh folder; prepared: a copy of the fetched + prepared one
    call: Callable[[], Any] | None = None  # serving rows: the library call that must raise
    xfail: str = ""  # not answered clearly yet: why, and where the fix belongs
    command: str = field(default="", compare=False)  # docs: the command, when not argv


def P(id: str, text: str | bytes, expect: str, input: str) -> Case:  # noqa: N802
    """A params.yaml row: ``ragtrain -p bad.yaml prepare`` in the prepared project."""
    return Case(id, "params", input, f"bad.yaml: {expect}", make=bad_params(text),
                argv=("-p", "bad.yaml", "prepare"), pre=(), project="prepared")


def C(id: str, argv: tuple[str, ...], expect: str, input: str,  # noqa: N802
      make: Callable[[Path], None] = nothing, code: int = 2, xfail: str = "") -> Case:
    """A CLI row in (a copy of) the prepared project."""
    return Case(id, "cli", input, expect, code, make, argv, (), "prepared", xfail=xfail)


def R(id: str, argv: tuple[str, ...], expect: str, input: str,  # noqa: N802
      make: Callable[[Path], None] = nothing, xfail: str = "") -> Case:
    """A registry row: the shared tracked project with an MLflow store and no model in it."""
    return Case(id, "registry", input, expect, 2, make, argv, (), "registry", xfail=xfail)


def S(id: str, call: Callable[[], Any], expect: str, input: str) -> Case:  # noqa: N802
    """A serving row: the served pyfunc's request check, answered HTTP 400."""
    return Case(id, "serving", input, expect, "HTTP 400 (RequestError)", argv=(), pre=(),
                project="none", call=call)


def _serving_calls() -> dict[str, Callable[[], Any]]:
    from ragtrain.generation.questions import (
        MAX_QUESTION_CHARS,
        MAX_QUESTIONS,
        check_questions,
        check_top_k,
        questions_in,
    )

    def frame(**cols: list) -> Any:
        import pandas as pd
        return pd.DataFrame(cols)

    return {
        "null": lambda: questions_in([None]),
        "number": lambda: questions_in([1, 2]),
        "bool": lambda: questions_in([True]),
        "list": lambda: questions_in([["a"]]),
        "empty-list": lambda: questions_in([]),
        "blank": lambda: questions_in([" \t "]),
        "long": lambda: check_questions(["a" * (MAX_QUESTION_CHARS + 1)]),
        "many": lambda: check_questions(["q"] * (MAX_QUESTIONS + 1)),
        "nul": lambda: questions_in(["a\x00b"]),
        "no-column": lambda: questions_in(frame(query=["a"])),
        "extra-column": lambda: questions_in(frame(question=["a"], x=[1])),
        "extra-field": lambda: questions_in({"question": "a", "top_k": 1}),
        "record-fields": lambda: questions_in([{"question": "a", "x": 1}]),
        "top_k-negative": lambda: check_top_k(-5),
        "top_k-huge": lambda: check_top_k(100000),
        "top_k-string": lambda: check_top_k("3"),
        "top_k-bool": lambda: check_top_k(True),
    }


def serving(key: str) -> Callable[[], Any]:
    return lambda: _serving_calls()[key]()


CASES: list[Case] = [
    # --- data: fetch + prepare of a bad source -----------------------------------------------
    Case("squad-broken-json", "data", "SQuAD file with a broken JSON line",
         "data/raw/dev.json:3: invalid JSON",
         make=source_file("dev.json", '{"version": "1.1",\n "data": [\n  {"title": x}]}')),
    Case("squad-not-utf8", "data", "SQuAD file with a non-UTF-8 byte (0xff)",
         "dev.json:1: not UTF-8 text (byte 0xff at offset",
         make=source_file("dev.json",
                          lambda: json.dumps(squad()).encode().replace(b"blue3", b"blu\xff3"))),
    Case("squad-no-data", "data", "SQuAD JSON without a 'data' list",
         "dev.json: expected a SQuAD object with a 'data' list",
         make=source_file("dev.json", '{"version": "1.1"}')),
    Case("squad-missing-question", "data", "SQuAD question without its 'question' field",
         "dev.json: data[0].paragraphs[0].qas[0]: missing field 'question'",
         make=squad_with(lambda d: qa0(d).pop("question"))),
    Case("squad-context-not-str", "data", "SQuAD 'context' is a number",
         "dev.json: data[1].paragraphs[0]: field 'context' must be str, got 5",
         make=squad_with(lambda d: d["data"][1]["paragraphs"][0].update(context=5))),
    Case("squad-blank-question", "data", "SQuAD question that is blank",
         "dev.json: data[0].paragraphs[0].qas[0]: field 'question' is empty",
         make=squad_with(lambda d: qa0(d).update(question="  "))),
    Case("squad-duplicate-qid", "data", "two SQuAD questions with the same id",
         "dev.json: data[2].paragraphs[0].qas[0]: duplicate question id 'q0a' (first at",
         make=squad_with(lambda d: d["data"][2]["paragraphs"][0]["qas"][0].update(id="q0a"))),
    Case("squad-answer-nowhere", "data", "SQuAD answer text not in its paragraph",
         "qas[0].answers[0]: answer 'zebra' appears nowhere in its paragraph",
         make=squad_with(lambda d: qa0(d).update(
             answers=[{"text": "zebra", "answer_start": 3}]))),
    Case("squad-no-answers", "data", "SQuAD v1.1 question with an empty answers list",
         "dev.json: data[0].paragraphs[0].qas[0]: field 'answers' is an empty list",
         make=squad_with(lambda d: qa0(d).update(answers=[]))),
    Case("squad-one-article", "data", "a split with no training documents (one article)",
         "params.data.test_fraction=0.2, dev_fraction=0.1: the split leaves no training documents",
         make=source_file("dev.json", lambda: json.dumps(squad(1)))),
    Case("empty-file", "data", "an empty source file", "data/raw/dev.json: empty input",
         make=source_file("dev.json", "")),
    Case("bad-zip", "data", "a .zip that is not a zip file", "dev.json.zip: not a valid zip file",
         make=source_file("dev.json.zip", b"PK\x03\x04 not really a zip"), argv=("fetch",),
         pre=()),
    Case("jsonl-broken-line", "data", "qa.jsonl with a broken JSON line",
         "qa.jsonl:2: invalid JSON", make=jsonl_pair(qa=GOOD_Q + '{"id": "q2", "question": \n')),
    Case("jsonl-not-utf8", "data", "corpus.jsonl with a non-UTF-8 byte",
         "corpus.jsonl:2: not UTF-8 text (byte 0xf6",
         make=jsonl_pair(corpus=GOOD_C.encode().replace(b"Rome", b"R\xf6me"), qa=GOOD_Q)),
    Case("jsonl-not-object", "data", "qa.jsonl line that is a JSON list",
         "qa.jsonl:1: expected a JSON object", make=jsonl_pair(qa="[1, 2]\n")),
    Case("jsonl-missing-text", "data", "corpus.jsonl passage without 'text'",
         "corpus.jsonl:2: missing field 'text'",
         make=jsonl_pair(corpus=GOOD_C.splitlines()[0] + '\n{"id": "d2"}\n', qa=GOOD_Q)),
    Case("jsonl-empty-text", "data", "corpus.jsonl passage with empty 'text'",
         "corpus.jsonl:1: field 'text' is empty",
         make=jsonl_pair(corpus='{"id": "d1", "text": ""}\n', qa=GOOD_Q)),
    Case("jsonl-duplicate-passage", "data", "two passages with the same id",
         "corpus.jsonl:2: duplicate passage id 'd1' (first at",
         make=jsonl_pair(corpus=GOOD_C.splitlines()[0] + "\n" + GOOD_C, qa=GOOD_Q)),
    Case("jsonl-duplicate-question", "data", "two questions with the same id",
         "qa.jsonl:2: duplicate question id 'q1'", make=jsonl_pair(GOOD_C, GOOD_Q + GOOD_Q)),
    Case("jsonl-gold-names-no-passage", "data", "gold_passage_ids naming no passage",
         "qa.jsonl:1: gold_passage_ids[0] = 'nope' names no passage",
         make=jsonl_pair(GOOD_C, json.dumps({"id": "q1", "question": "?", "answers": ["Paris"],
                                              "gold_passage_ids": ["nope"]}))),
    Case("jsonl-gold-not-list", "data", "gold_passage_ids a string, not a list",
         "qa.jsonl:1: field 'gold_passage_ids' must be list, got 'd1'",
         make=jsonl_pair(GOOD_C, '{"id": "q1", "question": "x?", "answers": ["Paris"], '
                                 '"gold_passage_ids": "d1"}')),
    Case("jsonl-answer-nowhere", "data", "an answer found in no passage",
         "qa.jsonl:1: no answer of ['Oslo'] appears in any passage",
         make=jsonl_pair(GOOD_C, '{"id": "q1", "question": "Capital of Norway?", '
                                 '"answers": ["Oslo"]}')),
    Case("jsonl-answers-not-list", "data", "'answers' a string, not a list",
         "qa.jsonl:1: field 'answers' must be list",
         make=jsonl_pair(GOOD_C, '{"id": "q1", "question": "Capital?", "answers": "Paris"}')),
    Case("jsonl-answers-missing", "data", "no 'answers' and no gold_passage_ids",
         "qa.jsonl:1: missing field 'answers'",
         make=jsonl_pair(GOOD_C, '{"id": "q1", "question": "Capital?"}')),
    Case("jsonl-empty-corpus", "data", "corpus.jsonl with blank lines only",
         "corpus.jsonl: empty input", make=jsonl_pair(corpus="\n\n")),
    Case("beir-qrels-unknown-passage", "data", "BEIR qrels naming no passage",
         "test.tsv:2: corpus-id 'zz' names no passage",
         make=beir(qrels="query-id\tcorpus-id\tscore\nq1\tzz\t1\n")),
    Case("beir-qrels-short-line", "data", "BEIR qrels line with two columns",
         "test.tsv:2: expected 3 tab-separated columns",
         make=beir(qrels="query-id\tcorpus-id\tscore\nq1\tc1\n")),
    Case("beir-qrels-bad-score", "data", "BEIR qrels score not a number",
         "test.tsv:2: score 'high' is not a number",
         make=beir(qrels="query-id\tcorpus-id\tscore\nq1\tc1\thigh\n")),
    Case("beir-query-no-text", "data", "BEIR queries.jsonl line without 'text'",
         "queries.jsonl:1: missing field 'text'", make=beir(queries='{"_id": "q1"}\n')),
    Case("checksum-mismatch", "data", "data.sha256 not the file's hash",
         "data.sha256: checksum mismatch for ",
         make=with_sha("0" * 64),
         argv=("fetch",), pre=()),
    Case("source-missing", "data", "data.source a path that does not exist",
         "data.source: nowhere/dev.json does not exist",
         make=lambda proj: params_for(proj, "nowhere/dev.json"), argv=("fetch",), pre=()),
    Case("zip-member-escapes", "data", "a .zip with a member `../evil.json` (zip slip)",
         "dev.json.zip: member '../evil.json' is a path that escapes the archive's folder",
         make=zip_source(("../evil.json", b"{}", None)), argv=("fetch",), pre=()),
    Case("zip-member-absolute", "data", "a .zip with a member at an absolute path",
         "dev.json.zip: member '/tmp/evil.json' is an absolute path",
         make=zip_source(("/tmp/evil.json", b"{}", None)), argv=("fetch",), pre=()),
    Case("zip-member-symlink", "data", "a .zip with a symbolic link member",
         "dev.json.zip: member 'link.json' is a symbolic link",
         make=zip_source(("link.json", b"/etc/passwd", 0o120777)), argv=("fetch",), pre=()),
    Case("folder-symlink", "data", "a data folder holding a symbolic link",
         "in/pair/extra.jsonl is a symbolic link; refused", make=folder_with_link,
         argv=("fetch",), pre=()),
    # --- params.yaml ---------------------------------------------------------------------------
    P("unknown-key", "data:\n  sourse: x\n", "params.data.sourse: unknown key",
      "a mistyped key (data.sourse)"),
    P("unknown-section", "bogus: 1\n", "params.bogus: unknown key", "an unknown top-level key"),
    P("unknown-nested-key", "retriever:\n  hybrid:\n    rrf: 3\n",
      "params.retriever.hybrid.rrf: unknown key", "an unknown nested key"),
    P("int-as-string", "data:\n  split_seed: '3'\n",
      "params.data.split_seed: expected an integer, got '3'", "an integer given as a string"),
    P("int-as-float", "data:\n  split_seed: 1.5\n", "params.data.split_seed: expected an integer",
      "an integer given as 1.5"),
    P("float-as-string", "retriever:\n  lr: '1e-4'\n",
      "params.retriever.lr: expected a number, got '1e-4'", "a number quoted as a string"),
    P("bool-as-yes", "data:\n  dedup_passages: yes\n",
      "params.data.dedup_passages: expected true or false", "`yes` for a boolean (YAML 1.2)"),
    P("fraction-out-of-range", "data:\n  test_fraction: 1.5\n",
      "params.data.test_fraction: must be < 1, got 1.5", "a fraction above 1"),
    P("negative-count", "data:\n  chunk_tokens: -1\n",
      "params.data.chunk_tokens: must be >= 0, got -1", "a negative count"),
    P("nan", "retriever:\n  temperature: .nan\n",
      "params.retriever.temperature: expected a finite", "NaN for a number"),
    P("bad-literal", "data:\n  format: csv\n", "params.data.format: expected one of",
      "a value outside a Literal (data.format: csv)"),
    P("literal-by-type", "generator:\n  enabled: 1\n", "params.generator.enabled: expected one of",
      "1 for generator.enabled (auto / true / false)"),
    P("bad-loss", "retriever:\n  loss: triplet\n", "params.retriever.loss: expected one of",
      "an unregistered retriever loss"),
    P("sha256-pattern", "data:\n  sha256: abc\n", "params.data.sha256: must match",
      "a sha256 that is not 64 hex digits"),
    P("section-not-mapping", "data: 3\n", "params.data: expected a mapping",
      "a section that is not a mapping"),
    P("list-item-type", "evaluation:\n  recall_ks: [1, x]\n",
      "params.evaluation.recall_ks[1]: expected an int", "a list item of the wrong type"),
    P("cross-chunk-overlap", "data:\n  chunk_tokens: 10\n  chunk_overlap: 10\n",
      "params.data.chunk_overlap", "chunk_overlap not below chunk_tokens (cross-field)"),
    P("cross-fractions", "data:\n  dev_fraction: 0.5\n  test_fraction: 0.5\n",
      "params.data.dev_fraction + test_fraction", "dev + test fractions leaving no train"),
    P("registry-model-name", "registry:\n  model_name: a/b\n", "params.registry.model_name",
      "a registry model name with a slash"),
    P("registry-min-gain", "registry:\n  min_gain: -1.0\n", "params.registry.min_gain",
      "a negative promotion gain"),
    P("registry-metric-name", "registry:\n  primary_metric: test/f1@5\n",
      "params.registry.primary_metric", "a metric name MLflow cannot log (`@`)"),
    P("not-utf8", b"data:\n  source: caf\xe9\n",
      "not UTF-8 text (invalid continuation byte at byte 19)",
      "params.yaml with a non-UTF-8 byte"),
    P("top-level-list", "- 1\n- 2\n", "expected a mapping of sections at the top level",
      "params.yaml that is a list"),
    P("duplicate-yaml-key", "data:\n  split_seed: 1\n  split_seed: 2\n", "invalid YAML",
      "the same key twice"),
    P("broken-yaml", "data: [\n", "invalid YAML", "a YAML syntax error"),
    # --- CLI -----------------------------------------------------------------------------------
    C("unknown-command", ("nosuch",), "invalid choice: 'nosuch'", "an unknown subcommand"),
    C("bad-choice", ("config", "show", "--format", "xml"), "argument --format: invalid choice",
      "an option value outside its choices"),
    C("bad-int-arg", ("ask", "--top-k", "abc", "q"), "argument --top-k: invalid int value",
      "a non-integer --top-k"),
    C("params-file-missing", ("-p", "missing.yaml", "prepare"), "missing.yaml: no such file",
      "-p naming a missing params file"),
    C("override-bad-value", ("config", "show", "-S", "data.split_seed=x"),
      "params.data.split_seed: expected an integer, got 'x'", "a -S override of the wrong type"),
    C("override-no-equals", ("config", "show", "-S", "data.split_seed"),
      "override 'data.split_seed': expected KEY=VALUE", "a -S override without `=`"),
    C("params-set-out-of-range", ("params", "set", "data.test_fraction=2"),
      "params.data.test_fraction: must be < 1, got 2.0",
      "`params set` of a bad value (params.yaml left as it was)"),
    C("params-set-unknown-key", ("params", "set", "data.nope=1"), "params.data.nope: unknown key",
      "`params set` of an unknown key"),
    C("ask-empty-question", ("ask", "   "), "ask: the question is empty", "a blank question"),
    C("ask-bundle-missing", ("ask", "--bundle", "nowhere", "q"), "nowhere/rag.json: missing",
      "--bundle naming no model bundle"),
    C("predict-missing-file", ("predict", "nowhere.jsonl", "-o", "out.jsonl"),
      "nowhere.jsonl: no such file", "a questions file that does not exist"),
    C("predict-broken-line", ("predict", "bad.jsonl", "-o", "out.jsonl"),
      "bad.jsonl:2: not JSON", "a questions file with a broken JSON line",
      make=files(bad_jsonl='{"question": "a"}\n{"question": \n')),
    C("predict-no-question", ("predict", "bad.jsonl", "-o", "out.jsonl"),
      'bad.jsonl:1: needs a non-empty string "question"', "a questions line without 'question'",
      make=files(bad_jsonl='{"id": "1"}\n')),
    C("predict-trec-tag", ("predict", "q.jsonl", "-o", "out.jsonl", "--trec-tag", "a b"),
      "--trec-tag: one word without spaces, got 'a b'", "a TREC run tag with a space",
      make=files(q_jsonl='{"question": "a"}\n')),
    C("evaluate-before-retrieve", ("evaluate",), "artifacts/retrieved/test.jsonl: missing",
      "a stage run before the stage it reads (evaluate)"),
    C("retrieve-before-bm25", ("retrieve",), "artifacts/bm25/meta.json: missing",
      "a stage run before the stage it reads (retrieve)",
      make=files(params_yaml="data:\n  source: x\n  sha256: ''\nretriever:\n  kind: bm25\n"
                 "tracking:\n  enabled: false\n")),
    C("dag-check-differs", ("dag", "--check", "--dvc-yaml", "dvc.yaml"),
      "dvc.yaml differs from the stage table", "a dvc.yaml edited by hand",
      make=files(dvc_yaml="stages: {}\n")),
    C("predict-not-utf8", ("predict", "bad.jsonl", "-o", "out.jsonl"),
      "bad.jsonl:1: not UTF-8 text (byte 0xe9 at offset 17)",
      "a questions file with a non-UTF-8 byte",
      make=files(bad_jsonl=b'{"question": "caf\xe9"}\n')),
    C("package-before-train-generator", ("package",),
      "artifacts/generator/generator.json (made by `ragtrain train-generator`)",
      "`package` run before the stages it bundles (index, generator)"),
    # --- registry (an MLflow store with no model in it) ---------------------------------------
    R("promote-nothing", ("promote",),
      "no ragtrain-rag@challenger to promote in sqlite:///mlruns/mlflow.db: register a model",
      "`promote` with nothing registered"),
    R("rollback-nothing", ("rollback",),
      "no ragtrain-rag@champion in sqlite:///mlruns/mlflow.db: nothing to roll back",
      "`rollback` with no previous champion"),
    R("ask-no-champion", ("ask", "--champion", "q"),
      "no model ragtrain-rag@champion in sqlite:///mlruns/mlflow.db", "`ask --champion` with no "
      "champion"),
    R("predict-no-alias", ("predict", "q.jsonl", "-o", "out.jsonl", "--alias", "challenger"),
      "no model ragtrain-rag@challenger in sqlite:///mlruns/mlflow.db",
      "`predict --alias challenger` with no challenger",
      make=files(q_jsonl='{"question": "a"}\n')),
    R("evaluate-champion-none", ("evaluate-champion",),
      "no model ragtrain-rag@champion in sqlite:///mlruns/mlflow.db",
      "`evaluate-champion` with no champion"),
    R("promote-unknown-version", ("promote", "--version", "7"),
      "ragtrain-rag version 7: Model Version (name=ragtrain-rag, version=7) not found",
      "`promote --version 7`, a version that does not exist"),
    R("register-no-bundle", ("register",), "artifacts/rag/rag.json: missing; build the RAG model",
      "`register` before `package`"),
    R("evaluate-champion-missing-file", ("evaluate-champion", "nowhere.jsonl"),
      "nowhere.jsonl: no such file", "`evaluate-champion` of a missing questions file"),
    R("file-store-uri", ("-p", "file.yaml", "promote"), "sqlite:///mlruns/mlflow.db",
      "tracking.uri a ./mlruns file store (refused by MLflow >= 3.13)",
      make=files(file_yaml="tracking:\n  uri: ./mlruns\n")),
    # --- serving: the request checks of the served model ---------------------------------------
    S("null-question", serving("null"), "question 0 is null", 'a JSON null question'),
    S("number-questions", serving("number"), "question 0 is a number", "numbers as questions"),
    S("bool-question", serving("bool"), "question 0 is a boolean", "true as a question"),
    S("nested-question", serving("list"), "question 0 is a list", "a list as a question"),
    S("empty-list", serving("empty-list"), "input: no questions", "an empty list"),
    S("blank-question", serving("blank"), "question 0 is empty or blank", "a blank question"),
    S("long-question", serving("long"), "characters; at most 1000", "a question over 1000 chars"),
    S("too-many", serving("many"), "questions in one request; at most 64", "65 questions"),
    S("nul-character", serving("nul"), "contains a NUL character", "a NUL in a question"),
    S("no-question-column", serving("no-column"), "expected a 'question' column",
      "a dataframe without the question column"),
    S("extra-column", serving("extra-column"), "unknown column(s) ['x']", "an extra column"),
    S("extra-field", serving("extra-field"), "unknown field(s) ['top_k']",
      "top_k inside the input instead of params"),
    S("record-fields", serving("record-fields"), "record 0 has fields", "a record with an extra "
      "field"),
    S("top_k-negative", serving("top_k-negative"), "params.top_k: expected an integer from 1",
      "top_k of -5"),
    S("top_k-huge", serving("top_k-huge"), "from 1 to 100, got 100000", "top_k of 100000"),
    S("top_k-string", serving("top_k-string"), "params.top_k: expected an integer, got str",
      'top_k of "3"'),
    S("top_k-bool", serving("top_k-bool"), "params.top_k: expected an integer, got a boolean",
      "top_k of true"),
]

# ----------------------------------------------------------------------------- running a row


def snapshot(root: Path) -> dict[str, str]:
    """Every file under ``root``: path -> content hash. (Folders are left out: a refused `fetch`
    leaves an empty ``data/`` folder, which holds no output.)"""
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if not p.is_dir()}


def changes(before: dict[str, str], after: dict[str, str]) -> list[str]:
    return sorted(k for k in before.keys() | after.keys() if before.get(k) != after.get(k))


def run_main_in_process(argv: list[str], cwd: Path) -> tuple[int, str]:
    """``ragtrain.cli:main`` (the console script's function) in ``cwd``: (status, stderr)."""
    import os

    from ragtrain import cli

    err, out = io.StringIO(), io.StringIO()
    old = Path.cwd()
    os.chdir(cwd)
    try:
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(out):
            try:
                rc = cli.main(argv)
            except SystemExit as e:  # argparse
                rc = int(e.code or 0)
    finally:
        os.chdir(old)
    return rc, err.getvalue()


def run_row(case: Case, proj: Path) -> tuple[int | str, str, list[str]]:
    """Make the bad input in ``proj``, run the call: (status, message, paths written)."""
    case.make(proj)
    for argv in case.pre:  # setup, in process (fast); the bad call itself runs the console script
        rc, err = run_main_in_process(list(argv), proj)
        assert rc == 0, f"{argv} should pass before the bad call:\n{err}"
    before = snapshot(proj)
    if case.call is not None:
        from ragtrain.errors import RequestError

        try:
            case.call()
        except RequestError as e:
            code, message = "HTTP 400 (RequestError)", str(e)
        else:
            code, message = "no error", ""
    elif case.project == "registry":
        code, message = run_main_in_process(list(case.argv), proj)
    else:
        r = run_cli(list(case.argv), proj)
        code, message = r.returncode, r.stderr
    return code, message, changes(before, snapshot(proj))


# ----------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def prepared(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One fetched + prepared tiny project (tracking off), copied for each row."""
    proj = tmp_path_factory.mktemp("prepared")
    params_for(proj, str(TINY))
    for stage in ("fetch", "prepare"):
        run_cli([stage], proj, check=True)
    return proj


@pytest.fixture(scope="module")
def registry_project(prepared: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The prepared project with tracking on: an MLflow sqlite store holding no model. Created
    by one refused `promote` first, so that the rows see a store that already exists."""
    proj = tmp_path_factory.mktemp("registry") / "proj"
    shutil.copytree(prepared, proj)
    (proj / "params.yaml").write_text(f"data:\n  source: {json.dumps(str(TINY))}\n  sha256: \"\"\n"
                                      "tracking:\n  enabled: true\n"
                                      "  uri: sqlite:///mlruns/mlflow.db\n")
    rc, err = run_main_in_process(["promote"], proj)
    assert rc == 2 and (proj / "mlruns/mlflow.db").is_file(), err
    return proj


def project_for(case: Case, tmp_path: Path, request: pytest.FixtureRequest) -> Path:
    if case.project == "prepared":
        proj = tmp_path / "proj"
        shutil.copytree(request.getfixturevalue("prepared"), proj)
        return proj
    if case.project == "registry":
        return request.getfixturevalue("registry_project")
    proj = tmp_path / "proj"
    proj.mkdir()
    return proj


# ----------------------------------------------------------------------------- the tests


def _param(case: Case) -> Any:
    marks = [pytest.mark.xfail(strict=True, reason=case.xfail)] if case.xfail else []
    return pytest.param(case, id=f"{case.area}-{case.id}", marks=marks)


@pytest.mark.parametrize("case", [_param(c) for c in CASES])
def test_bad_input_is_answered_clearly(case: Case, tmp_path: Path,
                                       request: pytest.FixtureRequest) -> None:
    proj = project_for(case, tmp_path, request)
    code, message, written = run_row(case, proj)
    assert code == case.code, message[-2000:]
    assert case.expect in message, message[-2000:]
    if case.call is None:
        lines = [x for x in message.splitlines() if x.strip()]
        assert "Traceback" not in message, message[-2000:]
        # ragtrain's own errors start `error: ...` (one line; a YAML syntax error adds its
        # `line N, column M` pointer); argparse's are its usage line, then one error line
        assert lines[0].startswith(("error: ", "usage: ragtrain")), message[-2000:]
    assert not written, f"written by a refused call: {written}"


def test_the_catalogue_is_big_and_unique() -> None:
    ids = [f"{c.area}-{c.id}" for c in CASES]
    assert len(ids) == len(set(ids))
    passing = [c for c in CASES if not c.xfail]
    assert len(passing) >= 40
    assert {c.area for c in passing} == {"data", "params", "cli", "registry", "serving"}


def test_a_failed_prepare_keeps_the_previous_outputs(prepared: Path, tmp_path: Path) -> None:
    """Not only no output from scratch: a refused rerun leaves the last good one untouched."""
    proj = tmp_path / "proj"
    shutil.copytree(prepared, proj)
    raw = proj / "data/raw/tiny_jsonl/qa.jsonl"
    raw.write_text(raw.read_text() + '{"id": "q9", "question": \n')
    before = snapshot(proj)
    r = run_cli(["prepare"], proj)
    assert r.returncode == 2 and "qa.jsonl:6: invalid JSON" in r.stderr, r.stderr
    assert not changes(before, snapshot(proj))


# ----------------------------------------------------------------------------- docs/errors.md


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def command_of(case: Case) -> str:
    if case.call is not None:
        return "served model: `POST /invocations` (checked by `generation/questions.py`)"
    pre = "".join(f"`ragtrain {' '.join(a)}`, then " for a in case.pre)
    return f"{pre}`ragtrain {' '.join(case.argv)}`"


def render() -> str:
    """docs/errors.md, from CASES."""
    passing = [c for c in CASES if not c.xfail]
    gaps = [c for c in CASES if c.xfail]
    counts = ", ".join(f"{a} {sum(c.area == a for c in passing)}"
                       for a in ("data", "params", "cli", "registry", "serving"))
    lines = [
        "# Errors: every bad input ragtrain answers",
        "",
        "Generated from the table in `tests/test_error_catalogue.py` (do not edit by hand):",
        "",
        "    .venv/bin/python tests/test_error_catalogue.py --write docs/errors.md",
        "",
        "Each row is tested: the call fails with the exit status (or HTTP status) shown; its",
        "message (`error: ...` on stderr for the CLI, no traceback; argparse's usage errors",
        "start with the usage line) contains the fragment shown, which names the file:line, the",
        "JSON key path or the params key; and the project folder is byte-for-byte unchanged",
        "afterwards: no file created, changed or removed (no output, no partial output, no temp",
        "file; a refused `fetch` leaves only an empty `data/` folder). Requests to the served",
        "model are refused by its request checks (`ragtrain.generation.questions`), which",
        "`mlflow models serve` answers with HTTP 400 and the same message; they touch no file.",
        "Registry rows run against an MLflow store (`sqlite:///mlruns/mlflow.db`) holding no",
        "model, through the console script's function (`ragtrain.cli:main`) in process.",
        "",
        f"{len(passing)} inputs: {counts}.",
        "",
        "| # | area | bad input | how it is run | message contains | exit / status "
        "| nothing written |",
        "|---|---|---|---|---|---|---|",
    ]
    for i, c in enumerate(passing, 1):
        nothing_written = ("yes (pure check, no I/O)" if c.call is not None
                           else "yes (project folder unchanged)")
        lines.append(f"| {i} | {c.area} | {_cell(c.input)} | {_cell(command_of(c))} "
                     f"| `{_cell(c.expect)}` | {c.code} | {nothing_written} |")
    if gaps:
        lines += ["", "## Not answered clearly yet", "",
                  "Kept in the table as expected failures (`xfail(strict=True)`): a fix makes "
                  "the test fail until the row moves up.", "",
                  "| bad input | how it is run | what happens |", "|---|---|---|"]
        lines += [f"| {_cell(c.input)} | {_cell(command_of(c))} | {_cell(c.xfail)} |"
                  for c in gaps]
    return "\n".join(lines) + "\n"


def test_docs_errors_md_is_generated_from_the_table() -> None:
    assert DOCS.is_file(), "run: .venv/bin/python tests/test_error_catalogue.py --write " \
                           "docs/errors.md"
    assert DOCS.read_text() == render(), ("docs/errors.md is stale; regenerate it: "
                                          ".venv/bin/python tests/test_error_catalogue.py "
                                          "--write docs/errors.md")


if __name__ == "__main__":
    import argparse

    ap = argparse.ArgumentParser(description="write docs/errors.md from the error catalogue")
    ap.add_argument("--write", type=Path, metavar="FILE", help="write it here (else: stdout)")
    args = ap.parse_args()
    if args.write:
        args.write.parent.mkdir(parents=True, exist_ok=True)
        args.write.write_text(render())
        print(f"{sum(not c.xfail for c in CASES)} inputs -> {args.write}")
    else:
        sys.stdout.write(render())
