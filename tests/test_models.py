"""Model names normalize as Ollama's do, and registry entries name their model one way."""

from __future__ import annotations

import pytest

from oshepherd.models import entry_model, entry_name, normalize


@pytest.mark.parametrize(
    ("name", "key"),
    [
        ("llama3", "llama3:latest"),
        ("llama3:latest", "llama3:latest"),
        ("Llama3:8B", "llama3:8b"),
        ("  llama3  ", "llama3:latest"),
        ("library/llama3", "llama3:latest"),
        ("registry.ollama.ai/library/llama3:latest", "llama3:latest"),
        ("https://registry.ollama.ai/library/llama3", "llama3:latest"),
        ("Registry.Ollama.AI/myns/x", "myns/x:latest"),
        ("myns/llama3:8b", "myns/llama3:8b"),
        ("registry.example:5000/ns/llama3", "registry.example:5000/ns/llama3:latest"),
        ("localhost:5000/library/x:q4", "localhost:5000/library/x:q4"),
        ("hf.co/org/Model-GGUF:Q4_K_M", "hf.co/org/model-gguf:q4_k_m"),
    ],
)
def test_normalize(name: str, key: str) -> None:
    assert normalize(name) == key


def test_normalize_is_idempotent() -> None:
    assert normalize(normalize("Qwen2.5")) == normalize("Qwen2.5")


@pytest.mark.parametrize(
    ("entry", "name"),
    [
        ({"name": "llama3:latest", "model": "llama3:latest"}, "llama3:latest"),
        ({"model": "Qwen:7B"}, "Qwen:7B"),
        ({"name": "phi3"}, "phi3"),
        ({"model": "", "name": "phi3"}, "phi3"),
        ({}, ""),
    ],
)
def test_an_entry_names_its_model_by_model_then_name(entry: dict[str, str], name: str) -> None:
    assert entry_name(entry) == name
    assert entry_model(entry) == normalize(name)
