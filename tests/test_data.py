from __future__ import annotations

import gzip
import json
import shutil
import zipfile
from pathlib import Path
from typing import Any

import pytest

from ragtrain import cli
from ragtrain.config import DataConfig
from ragtrain.data import formats
from ragtrain.data import prepare as data
from ragtrain.errors import DataError
from tests.conftest import FIXTURES

# ----------------------------------------------------------------- helpers


def squad(articles: list[tuple[str, list[tuple[str, list[tuple[str, str, str]]]]]]) -> dict:
    """[(title, [(context, [(qid, question, answer)])])] -> SQuAD JSON with true offsets."""
    out = []
    for title, paras in articles:
        ps = []
        for ctx, qas in paras:
            ps.append({"context": ctx, "qas": [
                {"id": qid, "question": q, "answers": [{"text": a, "answer_start": ctx.find(a)}]}
                for qid, q, a in qas]})
        out.append({"title": title, "paragraphs": ps})
    return {"version": "1.1", "data": out}


def tiny_squad(n_articles: int = 6) -> dict:
    return squad([
        (f"Art{i}", [(f"Article {i} says the color is blue{i} and the number is {i}.",
                      [(f"q{i}a", f"What color in {i}?", f"blue{i}"),
                       (f"q{i}b", f"What number in {i}?", f"{i}")])])
        for i in range(n_articles)
    ])


def project(tmp_path: Path, source: Path | str, **data_params: Any) -> Path:
    """A project folder whose params.yaml points at ``source``."""
    lines = [f"  source: {json.dumps(str(source))}", '  sha256: ""']
    lines += [f"  {k}: {json.dumps(v)}" for k, v in data_params.items()]
    (tmp_path / "params.yaml").write_text("data:\n" + "\n".join(lines) + "\n"
                                          "tracking:\n  enabled: false\n")
    return tmp_path


def run(proj: Path, *args: str, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture) -> tuple[int, str, str]:
    monkeypatch.chdir(proj)
    rc = cli.main(list(args))
    out = capsys.readouterr()
    return rc, out.out, out.err


def fetch_prepare(proj: Path, monkeypatch: pytest.MonkeyPatch,
                  capsys: pytest.CaptureFixture) -> tuple[int, str]:
    rc, _, err = run(proj, "fetch", monkeypatch=monkeypatch, capsys=capsys)
    if rc == 0:
        rc, _, err = run(proj, "prepare", monkeypatch=monkeypatch, capsys=capsys)
    return rc, err


def no_outputs(proj: Path) -> bool:
    leftovers = [p for p in (proj / "data").rglob("*") if ".tmp" in p.name] if (
        proj / "data").exists() else []
    return (not (proj / "data/prepared").exists() and not (proj / "metrics/prepare.json").exists()
            and not leftovers)


# ----------------------------------------------------------------- bad input, end to end


def _write(tmp_path: Path, name: str, content: bytes | str) -> Path:
    p = tmp_path / "in" / name
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_bytes(content.encode() if isinstance(content, str) else content)
    return p


def jsonl_pair(tmp_path: Path, corpus: str | None = None, qa: str | None = None) -> Path:
    d = tmp_path / "in" / "pair"
    d.mkdir(parents=True)
    (d / "corpus.jsonl").write_text(
        corpus if corpus is not None else (FIXTURES / "tiny_jsonl/corpus.jsonl").read_text())
    (d / "qa.jsonl").write_text(
        qa if qa is not None else (FIXTURES / "tiny_jsonl/qa.jsonl").read_text())
    return d


GOOD_Q = '{"id": "q1", "question": "Capital of France?", "answers": ["Paris"]}\n'
GOOD_C = '{"id": "d1", "text": "Paris is in France."}\n{"id": "d2", "text": "Rome is in Italy."}\n'


@pytest.mark.parametrize(
    ("make", "needle"),
    [
        ("squad_malformed", "dev.json:3: invalid JSON"),
        ("squad_no_data", "expected a SQuAD object with a 'data' list"),
        ("squad_missing_question", "qas[0]: missing field 'question'"),
        ("squad_int_context", "field 'context' must be str, got 5"),
        ("squad_empty_question", "qas[0]: field 'question' is empty"),
        ("squad_dup_qid", "duplicate question id 'q0a'"),
        ("squad_answer_nowhere", "answer 'zebra' appears nowhere in its paragraph"),
        ("squad_no_answers", "field 'answers' is an empty list"),
        ("squad_not_utf8", "not UTF-8 text (byte 0xff"),
        ("empty_file", "empty input"),
        ("jsonl_malformed", "qa.jsonl:2: invalid JSON"),
        ("jsonl_missing_text", "corpus.jsonl:2: missing field 'text'"),
        ("jsonl_empty_text", "corpus.jsonl:1: field 'text' is empty"),
        ("jsonl_dup_passage", "corpus.jsonl:2: duplicate passage id 'd1' (first at"),
        ("jsonl_dup_question", "qa.jsonl:2: duplicate question id 'q1'"),
        ("jsonl_bad_gold", "qa.jsonl:1: gold_passage_ids[0] = 'nope' names no passage"),
        ("jsonl_answer_nowhere", "qa.jsonl:1: no answer of ['Oslo'] appears in any passage"),
        ("jsonl_answers_wrong_type", "qa.jsonl:1: field 'answers' must be list"),
        ("jsonl_answers_missing", "qa.jsonl:1: missing field 'answers'"),
        ("jsonl_empty_corpus", "corpus.jsonl: empty input"),
        ("jsonl_not_object", "qa.jsonl:1: expected a JSON object"),
        ("one_document", "the split leaves no training documents"),
        ("bad_zip", "not a valid zip file"),
    ],
)
def test_bad_input_clear_error_and_no_output(
    make: str, needle: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture,
) -> None:
    good = tiny_squad()
    txt = json.dumps(good, indent=1)
    if make == "squad_malformed":
        src = _write(tmp_path, "dev.json", '{"version": "1.1",\n "data": [\n  {"title": x}]}')
    elif make == "squad_no_data":
        src = _write(tmp_path, "dev.json", '{"version": "1.1"}')
    elif make == "squad_missing_question":
        del good["data"][0]["paragraphs"][0]["qas"][0]["question"]
        src = _write(tmp_path, "dev.json", json.dumps(good))
    elif make == "squad_int_context":
        good["data"][1]["paragraphs"][0]["context"] = 5
        src = _write(tmp_path, "dev.json", json.dumps(good))
    elif make == "squad_empty_question":
        good["data"][0]["paragraphs"][0]["qas"][0]["question"] = "  "
        src = _write(tmp_path, "dev.json", json.dumps(good))
    elif make == "squad_dup_qid":
        good["data"][2]["paragraphs"][0]["qas"][0]["id"] = "q0a"
        src = _write(tmp_path, "dev.json", json.dumps(good))
    elif make == "squad_answer_nowhere":
        good["data"][0]["paragraphs"][0]["qas"][0]["answers"] = [
            {"text": "zebra", "answer_start": 3}]
        src = _write(tmp_path, "dev.json", json.dumps(good))
    elif make == "squad_no_answers":
        good["data"][0]["paragraphs"][0]["qas"][0]["answers"] = []
        src = _write(tmp_path, "dev.json", json.dumps(good))
    elif make == "squad_not_utf8":
        src = _write(tmp_path, "dev.json", txt.encode().replace(b"blue3", b"blu\xff3"))
    elif make == "empty_file":
        src = _write(tmp_path, "dev.json", "")
    elif make == "jsonl_malformed":
        src = jsonl_pair(tmp_path, qa=GOOD_Q + '{"id": "q2", "question": \n')
    elif make == "jsonl_missing_text":
        src = jsonl_pair(tmp_path, corpus=GOOD_C.splitlines()[0] + '\n{"id": "d2"}\n')
    elif make == "jsonl_empty_text":
        src = jsonl_pair(tmp_path, corpus='{"id": "d1", "text": ""}\n')
    elif make == "jsonl_dup_passage":
        src = jsonl_pair(tmp_path, corpus=GOOD_C.splitlines()[0] + "\n" + GOOD_C)
    elif make == "jsonl_dup_question":
        src = jsonl_pair(tmp_path, corpus=GOOD_C, qa=GOOD_Q + GOOD_Q)
    elif make == "jsonl_bad_gold":
        src = jsonl_pair(tmp_path, corpus=GOOD_C, qa=json.dumps(
            {"id": "q1", "question": "?", "answers": ["Paris"], "gold_passage_ids": ["nope"]}))
    elif make == "jsonl_answer_nowhere":
        src = jsonl_pair(tmp_path, corpus=GOOD_C,
                         qa='{"id": "q1", "question": "Capital of Norway?", "answers": ["Oslo"]}')
    elif make == "jsonl_answers_wrong_type":
        src = jsonl_pair(tmp_path, corpus=GOOD_C,
                         qa='{"id": "q1", "question": "Capital?", "answers": "Paris"}')
    elif make == "jsonl_answers_missing":
        src = jsonl_pair(tmp_path, corpus=GOOD_C, qa='{"id": "q1", "question": "Capital?"}')
    elif make == "jsonl_empty_corpus":
        src = jsonl_pair(tmp_path, corpus="\n\n")
    elif make == "jsonl_not_object":
        src = jsonl_pair(tmp_path, qa="[1, 2]\n")
    elif make == "one_document":
        src = _write(tmp_path, "dev.json", json.dumps(tiny_squad(1)))
    elif make == "bad_zip":
        src = _write(tmp_path, "dev.json.zip", b"PK\x03\x04 not really a zip")
    else:  # pragma: no cover
        raise AssertionError(make)
    proj = project(tmp_path, src)
    rc, err = fetch_prepare(proj, monkeypatch, capsys)
    assert rc == 2, err
    assert needle in err, err
    assert err.startswith("error: ")
    assert no_outputs(proj)


def test_failed_prepare_keeps_previous_outputs(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    src = _write(tmp_path, "dev.json", json.dumps(tiny_squad()))
    proj = project(tmp_path, src)
    assert fetch_prepare(proj, monkeypatch, capsys)[0] == 0
    before = (proj / "data/prepared/corpus.jsonl").read_text()
    raw = proj / "data/raw/dev.json"
    raw.write_text(raw.read_text()[:-10])  # truncate the fetched file
    rc, _, err = run(proj, "prepare", monkeypatch=monkeypatch, capsys=capsys)
    assert rc == 2 and "invalid JSON" in err
    assert (proj / "data/prepared/corpus.jsonl").read_text() == before
    assert not [p for p in (proj / "data").iterdir() if p.name.startswith(".")]


def test_checksum_mismatch(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                           capsys: pytest.CaptureFixture) -> None:
    src = _write(tmp_path, "dev.json", json.dumps(tiny_squad()))
    proj = project(tmp_path, src)
    (proj / "params.yaml").write_text(
        f"data:\n  source: {src}\n  sha256: '{'0' * 64}'\ntracking:\n  enabled: false\n")
    rc, _, err = run(proj, "fetch", monkeypatch=monkeypatch, capsys=capsys)
    assert rc == 2 and "data.sha256: checksum mismatch" in err and "0" * 64 in err
    assert not (proj / "data").exists() or not any((proj / "data").iterdir())


def test_unreachable_url(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                         capsys: pytest.CaptureFixture) -> None:
    proj = project(tmp_path, "http://127.0.0.1:9/dev-v1.1.json", download_timeout_s=5.0)
    rc, _, err = run(proj, "fetch", monkeypatch=monkeypatch, capsys=capsys)
    assert rc == 2
    assert "cannot download http://127.0.0.1:9/dev-v1.1.json" in err
    assert "point data.source at a local copy" in err
    assert not (proj / "data/raw").exists()


def test_missing_local_source(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                              capsys: pytest.CaptureFixture) -> None:
    proj = project(tmp_path, "nowhere/dev.json")
    rc, _, err = run(proj, "fetch", monkeypatch=monkeypatch, capsys=capsys)
    assert rc == 2 and "data.source: nowhere/dev.json does not exist" in err


# ----------------------------------------------------------------- real SQuAD


def test_squad_v11_dev_counts_and_checksums(
    squad_zip: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture
) -> None:
    # The pin is the sha256 of dev-v1.1.json; the zip's payload matches it.
    proj = project(tmp_path, squad_zip)
    (proj / "params.yaml").write_text(
        f"data:\n  source: {squad_zip}\n"
        "  sha256: 95aa6a52d5d6a735563366753ca50492a658031da74f301ac5238b03966972c9\n"
        "tracking:\n  enabled: false\n")
    rc, err = fetch_prepare(proj, monkeypatch, capsys)
    assert rc == 0, err
    stats = json.loads((proj / "metrics/prepare.json").read_text())
    assert stats["data/passages"] == 2067
    assert stats["data/questions"] == 10570
    assert stats["data/documents"] == 48
    assert stats["data/labels_lost"] == 0
    assert sum(stats[f"{s}/questions"] for s in data.SPLITS) == 10570
    corpus = [json.loads(x) for x in (proj / "data/prepared/corpus.jsonl").open()]
    assert len(corpus) == 2067 and set(corpus[0]) == {"passage_id", "doc_id", "title", "text"}
    test_rows = [json.loads(x) for x in (proj / "data/prepared/test.jsonl").open()]
    texts = {p["passage_id"]: p["text"] for p in corpus}
    # every gold passage really holds one of the answers
    assert all(any(a in texts[g] for a in r["answers"])
               for r in test_rows for g in r["gold_passage_ids"])


def test_squad_split_is_by_article_and_seeded(squad_zip: Path) -> None:
    ds = formats.read_dataset(squad_zip)
    a = data.prepare_dataset(ds, DataConfig(split_seed=0))
    b = data.prepare_dataset(ds, DataConfig(split_seed=0))
    c = data.prepare_dataset(ds, DataConfig(split_seed=1))
    docs = {s: {r["doc_id"] for r in a.queries[s]} for s in data.SPLITS}
    assert not (docs["train"] & docs["test"]) and not (docs["train"] & docs["dev"])
    assert not (docs["dev"] & docs["test"])
    doc_of = {p.passage_id: p.doc_id for p in a.passages}
    test_passages = {g for r in a.queries["test"] for g in r["gold_passage_ids"]}
    train_passages = {g for r in a.queries["train"] for g in r["gold_passage_ids"]}
    assert not (test_passages & train_passages)
    assert {doc_of[g] for g in test_passages} == docs["test"]
    assert a.queries == b.queries
    assert {r["doc_id"] for r in c.queries["test"]} != docs["test"]
    assert (len(docs["train"]), len(docs["dev"]), len(docs["test"])) == (33, 5, 10)


def test_squad_v2_unanswerable_skipped(tmp_path: Path) -> None:
    d = tiny_squad()
    d["version"] = "v2.0"
    d["data"][0]["paragraphs"][0]["qas"].append(
        {"id": "imp", "question": "Unanswerable?", "answers": [], "is_impossible": True})
    p = _write(tmp_path, "train-v2.0.json.gz", gzip.compress(json.dumps(d).encode()))
    ds = formats.read_dataset(p)
    assert ds.skipped["unanswerable"] == 1
    assert "imp" not in {q.qid for q in ds.questions}


# ----------------------------------------------------------------- chunking and gold mapping


def test_chunk_spans_windows_and_overlap() -> None:
    text = "a b c d e f g"
    offs = data.whitespace_offsets(text)
    spans = data.chunk_spans(offs, 3, 1)
    assert [text[s:e] for s, e in spans] == ["a b c", "c d e", "e f g"]
    assert [text[s:e] for s, e in data.chunk_spans(offs, 4, 0)] == ["a b c d", "e f g"]
    assert data.chunk_spans(offs, 0, 0) == [(0, len(text))]
    assert data.chunk_spans(offs, 100, 10) == [(0, len(text))]
    assert data.chunk_spans([], 3, 1) == []


def test_chunker_gold_mapping_and_lost_labels() -> None:
    ctx = "one two three four five six seven eight nine ten"
    d = squad([
        ("A", [(ctx, [("qa", "?", "two"), ("qb", "?", "four five"), ("qc", "?", "eight nine"),
                      ("qd", "?", "six seven eight nine ten")])]),
        ("B", [("alpha beta", [("qe", "?", "beta")])]),
        ("C", [("gamma delta", [("qf", "?", "delta")])]),
    ])
    ds = formats.read_squad(formats.Member("mem.json", lambda: json.dumps(d).encode()))
    cfg = DataConfig(chunk_tokens=4, chunk_overlap=1, test_fraction=0.34, dev_fraction=0.0)
    prep = data.prepare_dataset(ds, cfg)
    ids = [p.passage_id for p in prep.passages]
    # windows over A: [one..four] [four..seven] [seven..ten]
    assert ids[:3] == ["A/p000#c0", "A/p000#c1", "A/p000#c2"]
    gold = {r["id"]: r["gold_passage_ids"] for rows in prep.queries.values() for r in rows}
    assert gold["qa"] == ["A/p000#c0"]
    assert gold["qb"] == ["A/p000#c1"]  # "four five": only the 2nd window holds both
    assert gold["qc"] == ["A/p000#c2"]
    assert gold["qd"] == []  # spans two windows: lost, and counted
    assert prep.stats["data/labels_lost"] == 1
    assert prep.stats["data/questions_with_gold"] + 1 == prep.stats["data/questions"]


def test_chunking_with_hf_tokenizer_offsets() -> None:
    ctx = "The Eiffel Tower is in Paris. " * 20
    d = squad([(f"T{i}", [(ctx, [(f"q{i}", "?", "Paris")])]) for i in range(3)])
    ds = formats.read_squad(formats.Member("mem.json", lambda: json.dumps(d).encode()))
    cfg = DataConfig(chunk_tokens=32, chunk_overlap=8, chunk_tokenizer="all-MiniLM-L6-v2",
                     dedup_passages=False)
    prep = data.prepare_dataset(ds, cfg)
    assert len(prep.passages) > 3
    tok = data.make_tokenizer("all-MiniLM-L6-v2")
    assert max(len(tok(p.text)) for p in prep.passages) <= 32
    assert prep.stats["data/labels_lost"] == 0


def test_duplicate_passages_merged_and_gold_remapped() -> None:
    d = squad([
        ("A", [("Same text here about X.", [("qa", "?", "X")])]),
        ("B", [("Same   text here about X.", [("qb", "?", "X")]), ("Other Y.", [])]),
        ("C", [("Third Z.", [("qc", "?", "Z")])]),
    ])
    ds = formats.read_squad(formats.Member("mem.json", lambda: json.dumps(d).encode()))
    prep = data.prepare_dataset(ds, DataConfig(test_fraction=0.34, dev_fraction=0.0))
    assert prep.stats["data/passages_merged"] == 1
    assert len(prep.passages) == 3
    gold = {r["id"]: r["gold_passage_ids"] for rows in prep.queries.values() for r in rows}
    assert gold["qa"] == gold["qb"] == ["A/p000"]
    split = {r["doc_id"]: s for s, rows in prep.queries.items() for r in rows}
    assert prep.stats["data/duplicates_across_splits"] == int(split["A"] != split["B"])


# ----------------------------------------------------------------- other formats


def test_jsonl_pair_gold_by_answer_and_given(tmp_path: Path) -> None:
    ds = formats.read_dataset(FIXTURES / "tiny_jsonl")
    gold = {q.qid: q.gold_units for q in ds.questions}
    assert gold == {"q1": ["d1"], "q2": ["d2"], "q3": ["d3"], "q4": ["d4"], "q5": ["d5"]}
    prep = data.prepare_dataset(ds, DataConfig())
    assert sum(len(v) for v in prep.queries.values()) == 5
    # the same pair inside a zip
    z = tmp_path / "pair.zip"
    with zipfile.ZipFile(z, "w") as zf:
        for name in ("corpus.jsonl", "qa.jsonl"):
            zf.write(FIXTURES / "tiny_jsonl" / name, f"mydata/{name}")
    assert [q.qid for q in formats.read_dataset(z).questions] == [q.qid for q in ds.questions]


def test_beir_layout(tmp_path: Path) -> None:
    src = tmp_path / "beir"
    shutil.copytree(FIXTURES / "tiny_beir", src)
    ds = formats.read_dataset(src)
    assert formats.detect_format(formats._members(src)) == "beir"
    assert {q.qid: q.gold_units for q in ds.questions} == {
        "q1": ["c1"], "q2": ["c2"], "q3": ["c3"]}
    assert ds.skipped["query_without_qrels"] == 1
    (src / "qrels/test.tsv").write_text("query-id\tcorpus-id\tscore\nq1\tzz\t1\n")
    with pytest.raises(DataError, match=r"test.tsv:2: corpus-id 'zz' names no passage"):
        formats.read_dataset(src)
