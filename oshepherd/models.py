"""Model-name normalization, as Ollama does it.

``llama3`` ≡ ``llama3:latest`` and names are case-insensitive. Names have the form
``[host/][namespace/]model[:tag]``; a ':' before the last '/' belongs to a host's port
(``localhost:5000/library/x``), not to a tag.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

__all__ = ["entry_model", "entry_name", "normalize"]

DEFAULT_TAG = "latest"


def normalize(name: str) -> str:
    """The routing key of a model name: lower case, with ``:latest`` when no tag is given."""
    name = name.strip().lower()
    last_segment = name.rpartition("/")[2]
    if ":" not in last_segment:
        name = f"{name}:{DEFAULT_TAG}"
    return name


def entry_name(entry: Mapping[str, Any]) -> str:
    """The name of an Ollama ``/api/tags`` or ``/api/ps`` entry, as the host wrote it.

    Ollama writes both ``name`` and ``model`` (equal); an older or other server may write
    one of them only.
    """
    return str(entry.get("model") or entry.get("name") or "")


def entry_model(entry: Mapping[str, Any]) -> str:
    """The routing key of an ``/api/tags`` or ``/api/ps`` entry (``normalize``d)."""
    return normalize(entry_name(entry))
