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


class RetrievalError(RagtrainError, ValueError):
    """Invalid retrieval input (embeddings, ids, k, queries); the message shows the bad value."""


class IndexMismatchError(RetrievalError):
    """A saved index was built by another encoder or from another corpus; rebuild it."""


class IndexFileError(RagtrainError):
    """A saved index (dense or BM25) is missing or corrupted; the message names the file."""


class TrackingError(RagtrainError):
    """The MLflow store, a run, a registry call or a plot failed; the message says how to fix it."""


class RegistryError(TrackingError):
    """A registry action cannot be carried out (no challenger, no previous champion, ...)."""


class RequestError(RagtrainError, ValueError):
    """A request to the served model is invalid; the message names the field and what it expects."""
