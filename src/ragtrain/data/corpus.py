"""The prepared corpus: one ``Passage`` type and the one reader of ``data/prepared/corpus.jsonl``.

Retrieval, generation and the RAG model all read passages through ``Corpus``; what each builds
from a passage (the encoders' ``title. text`` input, a generator prompt) stays with its user.
"""

from __future__ import annotations

import functools
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ragtrain.errors import DataError
from ragtrain.io import read_jsonl


@dataclass(frozen=True)
class Passage:
    """One retrievable piece of text: a line of ``corpus.jsonl``."""

    passage_id: str
    title: str
    text: str
    doc_id: str = ""

    def row(self) -> dict[str, Any]:
        """The ``corpus.jsonl`` line of this passage."""
        return {"passage_id": self.passage_id, "doc_id": self.doc_id, "title": self.title,
                "text": self.text}


@dataclass(frozen=True)
class Corpus(Mapping[str, Passage]):
    """Passages in file order, looked up by id (``corpus[passage_id]``)."""

    passages: list[Passage]

    @classmethod
    def load(cls, path: Path) -> Corpus:
        """The passages of a prepared ``corpus.jsonl``; an empty file is a ``DataError``."""
        rows = read_jsonl(path)
        if not rows:
            raise DataError(f"{path}: empty corpus (no passages)")
        return cls([Passage(r["passage_id"], r.get("title", ""), r["text"], r.get("doc_id", ""))
                    for r in rows])

    @functools.cached_property
    def ids(self) -> list[str]:
        return [p.passage_id for p in self.passages]

    @functools.cached_property
    def by_id(self) -> dict[str, Passage]:
        return {p.passage_id: p for p in self.passages}

    @functools.cached_property
    def text_by_id(self) -> dict[str, str]:
        """Passage text alone (no title), by id: what answers are matched against."""
        return {p.passage_id: p.text for p in self.passages}

    def __getitem__(self, passage_id: str) -> Passage:
        return self.by_id[passage_id]

    def __iter__(self) -> Iterator[str]:
        return iter(self.ids)

    def __len__(self) -> int:
        return len(self.passages)


def check_gold_ids(rows: Sequence[Mapping[str, Any]], corpus: Corpus, where: str) -> None:
    """Raise ``DataError`` naming ``where`` if a question's gold passage is not in ``corpus``."""
    known = corpus.by_id
    for r in rows:
        for g in r["gold_passage_ids"]:
            if g not in known:
                raise DataError(f"{where}: question {r['id']!r} names gold passage {g!r}, which "
                                "is not in the corpus; rerun `ragtrain prepare`")
