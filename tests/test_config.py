"""Settings: the environment names derived from the settings models."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import AliasChoices, AliasPath, Field
from pydantic_settings import BaseSettings, SettingsConfigDict

from oshepherd.config import ApiSettings, WorkerSettings, env_names


def test_every_field_of_the_settings_has_its_environment_name() -> None:
    fields = {*ApiSettings.model_fields, *WorkerSettings.model_fields}
    assert env_names() == {name.upper() for name in fields}
    assert {"QUEUE_TIMEOUT", "STALL_TIMEOUT", "MAX_QUEUE_DEPTH", "CELERY_BROKER_URL"} <= env_names()


class Knobs(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="knob_", case_sensitive=False)

    plain: int = 0
    aliased: int = Field(default=0, validation_alias="other_name")
    either: int = Field(default=0, validation_alias=AliasChoices("first", AliasPath("second", 0)))


def test_names_are_the_ones_pydantic_settings_reads(monkeypatch: pytest.MonkeyPatch) -> None:
    names = env_names(Knobs)
    assert names == {"KNOB_PLAIN", "OTHER_NAME", "FIRST", "SECOND"}
    for name in names - {"SECOND"}:
        monkeypatch.setenv(name, "7")
    assert Knobs().model_dump() == {"plain": 7, "aliased": 7, "either": 7}
    monkeypatch.delenv("FIRST")
    monkeypatch.setenv("SECOND", "[8]")
    assert Knobs().either == 8


def test_queue_timeout_is_opt_in(monkeypatch: pytest.MonkeyPatch) -> None:
    """Unset or empty, a queued job has no deadline (as in Ollama); set, it has one."""
    monkeypatch.delenv("QUEUE_TIMEOUT", raising=False)
    assert ApiSettings().queue_timeout is None
    template = Path(__file__).parents[1] / ".api.env.template"
    assert ApiSettings(_env_file=template).queue_timeout is None  # type: ignore[call-arg]
    monkeypatch.setenv("QUEUE_TIMEOUT", "")
    assert ApiSettings().queue_timeout is None
    monkeypatch.setenv("QUEUE_TIMEOUT", "2.5")
    assert ApiSettings().queue_timeout == 2.5
    monkeypatch.setenv("QUEUE_TIMEOUT", "0")
    with pytest.raises(ValueError, match="queue_timeout"):
        ApiSettings()


@pytest.mark.parametrize("settings", [ApiSettings, WorkerSettings])
def test_a_log_level_logging_does_not_know_is_refused(settings: type[ApiSettings]) -> None:
    assert settings(loglevel="warning").loglevel == "WARNING"  # type: ignore[call-arg]
    with pytest.raises(ValueError, match="must be one of DEBUG, INFO"):
        settings(loglevel="verbose")  # type: ignore[call-arg]
