"""A whole Downpour deployment as real local processes (see ``downpour.localrun``)."""

from __future__ import annotations

from downpour.localrun import Deployment as Stack

__all__ = ["Stack"]
