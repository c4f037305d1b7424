"""Data: fetch the source, read SQuAD / own JSONL / BEIR, chunk, dedup, split."""

from __future__ import annotations
