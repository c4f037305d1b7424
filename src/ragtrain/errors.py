"""Errors that reach the user as one clear line and a non-zero exit."""

from __future__ import annotations


class RagtrainError(Exception):
    """Base class: the CLI prints ``error: <message>`` and exits with status 2."""


class ConfigError(RagtrainError, ValueError):
    """params.yaml (or an override) is invalid; the message names the dotted key."""


class DataError(RagtrainError, ValueError):
    """Input data is invalid; the message names the file and line or key."""


class SourceError(RagtrainError):
    """The data source cannot be fetched or fails its checksum."""
