"""Evaluation: answer metrics (EM / F1 / accuracy) and the local `evaluate` module."""

from __future__ import annotations
