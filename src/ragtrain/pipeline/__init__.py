"""The pipeline seam: paths, the stage table and stage functions, stage logging, orchestration."""

from __future__ import annotations
