"""ragtrain: train, evaluate, track and promote Retrieval-Augmented Generation models."""

from __future__ import annotations

__version__ = "0.1.0"
