"""What retrieval reads of a passage: its title, then its text, as one string.

The bi-encoder's passage tower, BM25, the reranker and the windows all see this text, so it
lives apart from the encoder: ``build_bm25`` uses it without importing torch.
"""

from __future__ import annotations

from collections.abc import Iterable

from ragtrain.data.corpus import Passage


def passage_input(title: str, text: str) -> str:
    """What the encoders and BM25 see of a passage: its title, then its text."""
    title = title.replace("_", " ").strip()
    return f"{title}. {text}" if title else text


def passage_inputs(passages: Iterable[Passage]) -> list[str]:
    """The encoders' input text of each passage (``passage_input``), in order."""
    return [passage_input(p.title, p.text) for p in passages]
