"""Retrieval: encoder, losses, mining, training, BM25, FAISS index, fusion, metrics."""

from __future__ import annotations
