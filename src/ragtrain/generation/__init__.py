"""Generation: generators (one interface, a backend per kind), their training, the extractive
reader baseline and the RAG model (retriever + generator)."""

from __future__ import annotations
