"""Model-name normalization, as Ollama does it (``types/model/name.go``).

``llama3`` ≡ ``llama3:latest`` ≡ ``library/llama3`` ≡ ``registry.ollama.ai/library/llama3``,
and names are case-insensitive. Names have the form ``[host/][namespace/]model[:tag]``; a
':' before the last '/' belongs to a host's port (``localhost:5000/library/x``), not to a
tag.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

__all__ = ["entry_model", "entry_name", "normalize"]

DEFAULT_TAG = "latest"
DEFAULT_NAMESPACE = "library"
DEFAULT_HOST = "registry.ollama.ai"


def normalize(name: str) -> str:
    """The routing key of a model name: lower case, Ollama's ``DisplayShortest`` of it
    (``ParseName`` with the default host, namespace and tag filled in, then the host and
    namespace left out where they are the defaults): the form a host lists its models in."""
    name = name.strip().lower()
    tag = DEFAULT_TAG
    if name.rfind(":") > name.rfind("/"):
        name, _, tag = name.rpartition(":")
    rest, _, model = name.rpartition("/")
    host, _, namespace = rest.rpartition("/")
    host = host.partition("://")[2] or host  # a scheme, as https://registry.ollama.ai/...
    namespace = namespace or DEFAULT_NAMESPACE
    if host and host != DEFAULT_HOST:
        return f"{host}/{namespace}/{model}:{tag}"
    if namespace != DEFAULT_NAMESPACE:
        return f"{namespace}/{model}:{tag}"
    return f"{model}:{tag}"


def entry_name(entry: Mapping[str, Any]) -> str:
    """The name of an Ollama ``/api/tags`` or ``/api/ps`` entry, as the host wrote it.

    Ollama writes both ``name`` and ``model`` (equal); an older or other server may write
    one of them only.
    """
    return str(entry.get("model") or entry.get("name") or "")


def entry_model(entry: Mapping[str, Any]) -> str:
    """The routing key of an ``/api/tags`` or ``/api/ps`` entry (``normalize``d)."""
    return normalize(entry_name(entry))
