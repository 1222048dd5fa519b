"""turnout's gateway: an Open Inference Protocol server with edge batching and traffic policies."""

from __future__ import annotations

__version__ = "0.1.0"

__all__ = ["__version__"]
