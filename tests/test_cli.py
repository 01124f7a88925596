"""The command line as a user runs it: `oshepherd up`, and settings from an env file."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import psutil
import pytest

from oshepherd.config import env_names
from oshepherd.redis_server import EmbeddedRedis, free_port
from oshepherd.stack import Stack, wait_until
from oshepherd.testing.standin import StandIn
from tests.conftest import tag_names

pytestmark = [pytest.mark.slow, pytest.mark.timeout(90)]


def clean_env(**extra: str) -> dict[str, str]:
    """This environment without any setting of oshepherd's, plus ``extra``."""
    settings = env_names()
    env = {k: v for k, v in os.environ.items() if k.upper() not in settings}
    return {**env, **extra}


@pytest.fixture
def host() -> Iterator[StandIn]:
    with StandIn(["llama3"]) as standin:
        yield standin


def test_up_runs_the_whole_stack_with_an_embedded_redis_and_stops_it(host: StandIn) -> None:
    port = free_port()
    command = [sys.executable, "-m", "oshepherd", "up", "--ollama", host.url, "--port", str(port)]
    up = subprocess.Popen(
        command, env=clean_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until(lambda: tag_names(url) == {"llama3:latest"}, 40, "stack up")
        body = {"model": "llama3", "prompt": "hi", "stream": False}
        assert httpx.post(url + "/api/generate", json=body, timeout=10).json()["done"] is True
        children = psutil.Process(up.pid).children(recursive=True)
        assert len(children) >= 3  # redis-server, the API, a worker
        up.send_signal(signal.SIGINT)  # Ctrl-C
        assert up.wait(timeout=60) == 0
        _, alive = psutil.wait_procs(children, timeout=10)
        assert alive == []
    finally:
        if up.poll() is None:
            up.kill()


def test_start_api_reads_the_original_template_names_from_an_env_file(
    tmp_path: Path, host: StandIn
) -> None:
    """The API's Redis is the env file's CELERY_BROKER_URL: it lists the model of a worker
    registered there (were the URL ignored, it would look at 127.0.0.1:6379 and not)."""
    with (
        EmbeddedRedis() as redis_server,
        Stack(redis_server.url, log=subprocess.DEVNULL) as stack,
    ):
        stack.start_worker(host.url)
        port = free_port()
        env_file = tmp_path / ".api.env"
        env_file.write_text(f"HOST=127.0.0.1\nPORT={port}\nCELERY_BROKER_URL={redis_server.url}\n")
        command = [sys.executable, "-m", "oshepherd", "start-api", "--env-file", str(env_file)]
        api = subprocess.Popen(command, env=clean_env(), stderr=subprocess.DEVNULL)
        try:
            url = f"http://127.0.0.1:{port}"
            wait_until(lambda: "llama3:latest" in tag_names(url), 20, "model listed", process=api)
        finally:
            api.terminate()
            api.wait(timeout=30)


def test_bad_settings_are_refused_with_a_clear_message(tmp_path: Path) -> None:
    env_file = tmp_path / ".worker.env"
    env_file.write_text("CONCURRENCY=0\nOLLAMA_BASE_URL=localhost:11434\n")
    command = [sys.executable, "-m", "oshepherd", "start-worker", "--env-file", str(env_file)]
    result = subprocess.run(command, env=clean_env(), capture_output=True, text=True, timeout=30)
    assert result.returncode == 2
    assert "concurrency" in result.stderr and "ollama_base_url" in result.stderr
