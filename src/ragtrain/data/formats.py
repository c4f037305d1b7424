"""Read QA data: SQuAD JSON, the user's own corpus + QA JSONL, or BEIR, into one ``Dataset``.

Everything here validates as it reads: a bad record raises ``DataError`` naming the file and the
line (JSONL) or the JSON key path (SQuAD), never a half-written output.
"""

from __future__ import annotations

import gzip
import json
import zipfile
from collections import Counter
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

from ragtrain.data.source import find_symlink, unsafe_zip_member
from ragtrain.errors import DataError

# --------------------------------------------------------------------------- records


@dataclass
class Unit:
    """A piece of a document that is passage-sized before chunking (a SQuAD paragraph)."""

    unit_id: str
    doc_id: str
    title: str
    text: str


@dataclass
class Question:
    qid: str
    question: str
    answers: list[str]
    doc_id: str
    where: str  # file:line or file:key, for messages
    # Answer character spans inside a unit: (unit_id, start, end). SQuAD has them.
    spans: list[tuple[str, int, int]] = field(default_factory=list)
    # Units named as gold by the input (JSONL gold_passage_ids, BEIR qrels), without offsets.
    gold_units: list[str] = field(default_factory=list)


@dataclass
class Dataset:
    units: list[Unit]
    questions: list[Question]
    skipped: Counter[str] = field(default_factory=Counter)


# --------------------------------------------------------------------------- reading


@dataclass(frozen=True)
class Member:
    """One input file: a real file, or a member of a .zip / .gz; ``name`` is for messages."""

    name: str
    read: Callable[[], bytes]


def _members(payload: Path) -> dict[str, Member]:
    """Map relative POSIX paths to readable members of a folder, a .zip, a .gz or a file."""
    if payload.is_dir():
        if link := find_symlink(payload):  # e.g. data/raw edited by hand: never follow a link
            raise DataError(f"{link}: a symbolic link in the data folder; refused")
        return {
            p.relative_to(payload).as_posix(): Member(str(p), p.read_bytes)
            for p in sorted(payload.rglob("*"))
            if p.is_file()
        }
    low = payload.name.lower()
    if low.endswith(".zip"):
        try:
            z = zipfile.ZipFile(payload)
        except zipfile.BadZipFile as e:
            raise DataError(f"{payload}: not a valid zip file ({e})") from None

        for i in z.infolist():
            if why := unsafe_zip_member(i):
                raise DataError(f"{payload}:{i.filename}: a zip member that is {why}; refused")

        def reader(n: str) -> Callable[[], bytes]:
            return lambda: z.read(n)

        return {
            i.filename: Member(f"{payload}:{i.filename}", reader(i.filename))
            for i in z.infolist()
            if not i.is_dir() and not PurePosixPath(i.filename).name.startswith(".")
            and "__MACOSX" not in i.filename
        }
    if low.endswith(".gz"):
        inner = payload.name[: -len(".gz")]

        def gunzip() -> bytes:
            try:
                return gzip.decompress(payload.read_bytes())
            except (OSError, EOFError) as e:
                raise DataError(f"{payload}: not a valid gzip file ({e})") from None

        return {inner: Member(f"{payload}:{inner}", gunzip)}
    return {payload.name: Member(str(payload), payload.read_bytes)}


def _find(members: Mapping[str, Member], suffix: str) -> Member | None:
    hits = [m for k, m in members.items() if k == suffix or k.endswith("/" + suffix)]
    return hits[0] if len(hits) == 1 else None


def detect_format(members: Mapping[str, Member]) -> str:
    keys = list(members)
    if _find(members, "corpus.jsonl") and _find(members, "qa.jsonl"):
        return "jsonl"
    if _find(members, "corpus.jsonl") and _find(members, "queries.jsonl"):
        return "beir"
    jsons = [k for k in keys if k.lower().endswith(".json")]
    if len(jsons) == 1:
        return "squad"
    raise DataError(
        f"cannot tell the data format from the files {keys[:10]}: expected one SQuAD .json "
        "(plain, .zip or .gz), corpus.jsonl + qa.jsonl, or BEIR corpus.jsonl + queries.jsonl + "
        "qrels/*.tsv; or set data.format"
    )


def _text(m: Member) -> str:
    data = m.read()
    if not data.strip():
        raise DataError(f"{m.name}: empty input")
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = data[: e.start].count(b"\n") + 1
        raise DataError(
            f"{m.name}:{line}: not UTF-8 text (byte 0x{data[e.start]:02x} at offset {e.start})"
        ) from None


def iter_jsonl(m: Member) -> Iterator[tuple[int, dict[str, Any]]]:
    """(line number, object) for each non-blank line; malformed lines name the line."""
    for lineno, line in enumerate(_text(m).splitlines(), 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            msg = f"{m.name}:{lineno}: invalid JSON: {e.msg} (column {e.colno})"
            raise DataError(msg) from None
        if not isinstance(obj, dict):
            raise DataError(f"{m.name}:{lineno}: expected a JSON object, got {type(obj).__name__}")
        yield lineno, obj


def _field(obj: Mapping[str, Any], key: str, where: str, kind: type | tuple[type, ...],
           *, required: bool = True, nonempty: bool = True) -> Any:
    if key not in obj or obj[key] is None:
        if required:
            raise DataError(f"{where}: missing field {key!r}")
        return None
    v = obj[key]
    if isinstance(v, bool) or not isinstance(v, kind):
        names = kind.__name__ if isinstance(kind, type) else "/".join(k.__name__ for k in kind)
        raise DataError(f"{where}: field {key!r} must be {names}, got {v!r}")
    if nonempty and isinstance(v, str) and not v.strip():
        raise DataError(f"{where}: field {key!r} is empty")
    return v


def _id(obj: Mapping[str, Any], key: str, where: str) -> str:
    return str(_field(obj, key, where, (str, int)))


def _answers(obj: Mapping[str, Any], where: str, *, required: bool = True) -> list[str]:
    raw = _field(obj, "answers", where, list, required=required)
    if raw is None:
        return []
    if required and not raw:
        raise DataError(f"{where}: field 'answers' is an empty list (references missing)")
    out = []
    for i, a in enumerate(raw):
        if isinstance(a, dict):  # SQuAD-style {"text": ...} accepted too
            a = a.get("text")
        if not isinstance(a, str) or not a.strip():
            raise DataError(f"{where}: answers[{i}] must be a non-empty string, got {a!r}")
        out.append(a)
    return list(dict.fromkeys(out))


def _unique(seen: dict[str, str], key: str, where: str, what: str) -> None:
    if key in seen:
        raise DataError(f"{where}: duplicate {what} {key!r} (first at {seen[key]})")
    seen[key] = where


def read_squad(m: Member) -> Dataset:
    """SQuAD v1.1 / v2.0 JSON. Unanswerable v2 questions are skipped and counted."""
    text = _text(m)
    try:
        doc = json.loads(text)
    except json.JSONDecodeError as e:
        raise DataError(f"{m.name}:{e.lineno}: invalid JSON: {e.msg} (column {e.colno})") from None
    if not isinstance(doc, dict) or not isinstance(doc.get("data"), list):
        raise DataError(f"{m.name}: expected a SQuAD object with a 'data' list")
    if not doc["data"]:
        raise DataError(f"{m.name}: 'data' is empty")
    units: list[Unit] = []
    questions: list[Question] = []
    skipped: Counter[str] = Counter()
    titles: dict[str, str] = {}
    qids: dict[str, str] = {}
    for ai, art in enumerate(doc["data"]):
        w = f"{m.name}: data[{ai}]"
        if not isinstance(art, dict):
            raise DataError(f"{w}: expected an object")
        title = _field(art, "title", w, str)
        _unique(titles, title, w, "article title")
        paragraphs = _field(art, "paragraphs", w, list)
        for pi, para in enumerate(paragraphs):
            pw = f"{w}.paragraphs[{pi}]"
            if not isinstance(para, dict):
                raise DataError(f"{pw}: expected an object")
            context = _field(para, "context", pw, str)
            unit = Unit(f"{title}/p{pi:03d}", title, title, context)
            units.append(unit)
            for qi, qa in enumerate(_field(para, "qas", pw, list, nonempty=False)):
                qw = f"{pw}.qas[{qi}]"
                if not isinstance(qa, dict):
                    raise DataError(f"{qw}: expected an object")
                qid = _id(qa, "id", qw)
                _unique(qids, qid, qw, "question id")
                question = _field(qa, "question", qw, str)
                raw_answers = _field(qa, "answers", qw, list, nonempty=False)
                if qa.get("is_impossible") is True or not raw_answers:
                    if qa.get("is_impossible") is True:
                        skipped["unanswerable"] += 1
                        continue
                    raise DataError(f"{qw}: field 'answers' is an empty list (references missing)")
                answers: list[str] = []
                spans: list[tuple[str, int, int]] = []
                for ri, ans in enumerate(raw_answers):
                    rw = f"{qw}.answers[{ri}]"
                    if not isinstance(ans, dict):
                        raise DataError(f"{rw}: expected an object with 'text' and 'answer_start'")
                    atext = _field(ans, "text", rw, str)
                    start = _field(ans, "answer_start", rw, int, required=False)
                    if start is None or context[start : start + len(atext)] != atext:
                        found = context.find(atext)
                        if found < 0:
                            raise DataError(
                                f"{rw}: answer {atext!r} appears nowhere in its paragraph"
                            )
                        start = found
                    answers.append(atext)
                    spans.append((unit.unit_id, start, start + len(atext)))
                questions.append(
                    Question(qid, question, list(dict.fromkeys(answers)), title, qw, spans=spans)
                )
    return Dataset(units, questions, skipped)


def _read_corpus_jsonl(m: Member, id_key: str) -> list[Unit]:
    units: list[Unit] = []
    seen: dict[str, str] = {}
    for lineno, obj in iter_jsonl(m):
        w = f"{m.name}:{lineno}"
        pid = _id(obj, id_key, w)
        _unique(seen, pid, w, "passage id")
        title = _field(obj, "title", w, str, required=False, nonempty=False) or ""
        text = _field(obj, "text", w, str)
        units.append(Unit(pid, pid, title, text))
    if not units:
        raise DataError(f"{m.name}: empty input (no passages)")
    return units


def _locate(answers: list[str], units: list[Unit]) -> list[str]:
    """Units whose text contains one of the answers (case-insensitive)."""
    low = [a.lower() for a in answers]
    return [u.unit_id for u in units if any(a in u.text.lower() for a in low)]


def _question_lines(m: Member, id_key: str, what: str
                    ) -> Iterator[tuple[str, str, dict[str, Any]]]:
    """(file:line, id, object) of each question line; a repeated id is a ``DataError``."""
    seen: dict[str, str] = {}
    for lineno, obj in iter_jsonl(m):
        w = f"{m.name}:{lineno}"
        qid = _id(obj, id_key, w)
        _unique(seen, qid, w, what)
        yield w, qid, obj


def read_jsonl_pair(corpus: Member, qa: Member) -> Dataset:
    """The user's own data: corpus.jsonl (id, title?, text) + qa.jsonl (id, question, answers,
    gold_passage_ids?). Without gold ids, the passages containing an answer are the gold; with
    them, answers may be left out (a question for the retriever only)."""
    units = _read_corpus_jsonl(corpus, "id")
    by_id = {u.unit_id: u for u in units}
    questions: list[Question] = []
    skipped: Counter[str] = Counter()
    for w, qid, obj in _question_lines(qa, "id", "question id"):
        question = _field(obj, "question", w, str)
        gold_raw = _field(obj, "gold_passage_ids", w, list, required=False)
        # with gold ids, answers may be absent or [] (a retrieval-only question: the retriever
        # trains on it, the generator leaves it out and counts it)
        answers = _answers(obj, w, required=gold_raw is None)
        if gold_raw is not None:
            gold = []
            for i, g in enumerate(gold_raw):
                if not isinstance(g, str | int) or isinstance(g, bool) or str(g) not in by_id:
                    raise DataError(
                        f"{w}: gold_passage_ids[{i}] = {g!r} names no passage in {corpus.name}"
                    )
                gold.append(str(g))
            if not gold:
                raise DataError(f"{w}: gold_passage_ids is an empty list")
            if answers and not _locate(answers, [by_id[g] for g in gold]):
                skipped["answer_not_in_gold_passage"] += 1
        else:
            gold = _locate(answers, units)
            if not gold:
                raise DataError(
                    f"{w}: no answer of {answers!r} appears in any passage of {corpus.name}; "
                    "give gold_passage_ids for abstractive answers"
                )
        questions.append(Question(qid, question, answers, by_id[gold[0]].doc_id, w,
                                  gold_units=gold))
    if not questions:
        raise DataError(f"{qa.name}: empty input (no questions)")
    return Dataset(units, questions, skipped)


def read_beir(members: Mapping[str, Member]) -> Dataset:
    """BEIR: corpus.jsonl (_id, title, text), queries.jsonl (_id, text), qrels/*.tsv.
    BEIR has no answer strings: answers stay empty (retrieval metrics only)."""
    corpus, queries = _find(members, "corpus.jsonl"), _find(members, "queries.jsonl")
    assert corpus and queries
    units = _read_corpus_jsonl(corpus, "_id")
    by_id = {u.unit_id: u for u in units}
    qrels: dict[str, list[str]] = {}
    qrel_files = [m for k, m in members.items() if "qrels/" in k and k.endswith(".tsv")]
    if not qrel_files:
        raise DataError(f"{corpus.name}: BEIR layout without qrels/*.tsv")
    for m in qrel_files:
        for lineno, line in enumerate(_text(m).splitlines(), 1):
            cols = line.split("\t")
            if lineno == 1 and cols[0] == "query-id":
                continue
            if not line.strip():
                continue
            if len(cols) != 3:
                raise DataError(f"{m.name}:{lineno}: expected 3 tab-separated columns")
            qid, pid, score = cols
            try:
                s = float(score)
            except ValueError:
                raise DataError(f"{m.name}:{lineno}: score {score!r} is not a number") from None
            if pid not in by_id:
                raise DataError(f"{m.name}:{lineno}: corpus-id {pid!r} names no passage")
            if s > 0:
                qrels.setdefault(qid, []).append(pid)
    questions: list[Question] = []
    skipped: Counter[str] = Counter()
    for w, qid, obj in _question_lines(queries, "_id", "query id"):
        text = _field(obj, "text", w, str)
        gold = qrels.get(qid)
        if not gold:
            skipped["query_without_qrels"] += 1
            continue
        questions.append(Question(qid, text, [], by_id[gold[0]].doc_id, w, gold_units=gold))
    if not questions:
        raise DataError(f"{queries.name}: no query has a relevant passage in qrels")
    return Dataset(units, questions, skipped)


def read_dataset(payload: Path, fmt: str = "auto") -> Dataset:
    if not payload.exists():
        raise DataError(f"{payload}: no such file; run `ragtrain fetch` first")
    members = _members(payload)
    if not members:
        raise DataError(f"{payload}: empty input (no files)")
    fmt = detect_format(members) if fmt == "auto" else fmt
    if fmt == "squad":
        jsons = [m for k, m in members.items() if k.lower().endswith(".json")]
        if len(jsons) != 1:
            raise DataError(f"{payload}: expected exactly one .json file, found {len(jsons)}")
        return read_squad(jsons[0])
    if fmt == "jsonl":
        corpus, qa = _find(members, "corpus.jsonl"), _find(members, "qa.jsonl")
        if not corpus or not qa:
            raise DataError(f"{payload}: data.format=jsonl needs corpus.jsonl and qa.jsonl")
        return read_jsonl_pair(corpus, qa)
    if not _find(members, "corpus.jsonl") or not _find(members, "queries.jsonl"):
        raise DataError(f"{payload}: data.format=beir needs corpus.jsonl and queries.jsonl")
    return read_beir(members)
