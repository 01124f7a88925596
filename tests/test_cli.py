"""The command line as a user runs it: `oshepherd up`, and settings from an env file."""

from __future__ import annotations

import os
import re
import signal
import socket
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
    up = subprocess.Popen(  # SIGINT ignored, as in a background job of a script
        command,
        env=clean_env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_IGN),
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


def up_command(host: StandIn, port: int, *extra: str) -> list[str]:
    """``oshepherd up`` for ``host`` on ``port``, with ``extra`` options."""
    options = ["--ollama", host.url, "--port", str(port), *extra]
    return [sys.executable, "-m", "oshepherd", "up", *options]


def test_up_with_its_port_taken_stops_what_it_started_and_fails_in_one_line(
    host: StandIn,
) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = subprocess.run(
            up_command(host, port), env=clean_env(), capture_output=True, text=True, timeout=60
        )
    assert result.returncode == 1
    assert "Traceback" not in result.stderr and "is up" not in result.stderr
    last = result.stderr.strip().splitlines()[-1]
    assert last == f"Error: port {port} on 127.0.0.1 is already in use; stopped what had started"
    redis_port = int(re.findall(r"Redis \(embedded\) at redis://127.0.0.1:(\d+)", result.stderr)[0])
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", redis_port), timeout=2).close()


def test_up_with_a_redis_that_does_not_answer_fails_in_one_line(host: StandIn) -> None:
    command = up_command(host, free_port(), "--redis-url", f"redis://127.0.0.1:{free_port()}/0")
    result = subprocess.run(command, env=clean_env(), capture_output=True, text=True, timeout=60)
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1].startswith("Error: Redis at redis://127.0.0.1:")


@pytest.mark.parametrize(
    ("process", "name"), [("start-api", "api"), ("redis-server", "the embedded Redis")]
)
def test_up_fails_when_a_part_dies_and_stops_the_rest(
    host: StandIn, tmp_path: Path, process: str, name: str
) -> None:
    port = free_port()
    log = tmp_path / "up.log"
    with log.open("w") as stderr:  # the stack's logs too: a pipe nobody reads would fill
        up = subprocess.Popen(up_command(host, port), env=clean_env(), stderr=stderr)
    try:
        wait_until(lambda: tag_names(f"http://127.0.0.1:{port}") == {"llama3:latest"}, 40, "up")
        children = psutil.Process(up.pid).children(recursive=True)
        part = next(c for c in children if any(process in word for word in c.cmdline()))
        part.kill()
        assert up.wait(timeout=60) == 1
        output = log.read_text()
        assert "Traceback" not in output
        last = output.strip().splitlines()[-1]
        assert last == f"Error: {name} exited with code -9; stopped the stack"
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


def test_a_worker_says_at_once_when_its_ollama_does_not_answer(
    redis_server: EmbeddedRedis, tmp_path: Path
) -> None:
    """A wrong Ollama URL is a warning on the first poll, not silence until Ollama has
    answered once and then stopped."""
    nowhere = f"http://127.0.0.1:{free_port()}"
    log = tmp_path / "worker.log"
    env = clean_env(CELERY_BROKER_URL=redis_server.url, OLLAMA_BASE_URL=nowhere)
    with log.open("w") as stderr:
        command = [sys.executable, "-m", "oshepherd", "start-worker"]
        worker = subprocess.Popen(command, env=env, stderr=stderr)
    try:
        wait_until(lambda: f"Ollama at {nowhere} is unreachable" in log.read_text(), 30, "warning")
    finally:
        worker.terminate()
        worker.wait(timeout=30)
