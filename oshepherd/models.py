"""Model-name normalization, as Ollama does it.

``llama3`` ≡ ``llama3:latest`` and names are case-insensitive. Names have the form
``[host/][namespace/]model[:tag]``; a ':' before the last '/' belongs to a host's port
(``localhost:5000/library/x``), not to a tag.
"""

from __future__ import annotations

__all__ = ["normalize"]

DEFAULT_TAG = "latest"


def normalize(name: str) -> str:
    """The routing key of a model name: lower case, with ``:latest`` when no tag is given."""
    name = name.strip().lower()
    last_segment = name.rpartition("/")[2]
    if ":" not in last_segment:
        name = f"{name}:{DEFAULT_TAG}"
    return name
