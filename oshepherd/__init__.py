"""oshepherd: one Ollama endpoint in front of a fleet of Ollama hosts."""

from __future__ import annotations

__version__ = "0.2.0"
