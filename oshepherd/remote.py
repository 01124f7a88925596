"""``oshepherd status`` and ``oshepherd pull``: the fleet seen and steered over HTTP, from any
machine that reaches the gateway (docs/operations.md).

Both take ``--url`` (``OSHEPHERD_URL``, default ``http://127.0.0.1:5001``: the gateway, not
an Ollama host, so ``OLLAMA_HOST`` is not read) and ``--key`` (``OLLAMA_API_KEY``, sent as
``Authorization: Bearer``; the fleet API needs an admin key once keys exist). A gateway that
cannot be reached, refuses the key or is no oshepherd is one line on stderr and exit 1.
"""

from __future__ import annotations

import json
import signal
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import click
import httpx
import rich.console
import rich.progress
import rich.table
from rich.console import Group
from rich.live import Live
from rich.text import Text

__all__ = ["pull", "status"]

DEFAULT_URL = "http://127.0.0.1:5001"
FLEET_PATH = "/oshepherd/v1/fleet"
TIMEOUT = 10.0  # seconds for a status answer, or between two lines of pull progress
TABLE_WIDTH = 200  # columns when the output is not a terminal
LEVELS = ("high", "normal", "low")  # the queues' priorities, highest first
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)  # what ends `status --watch`

URL = click.option(
    "--url",
    envvar="OSHEPHERD_URL",
    default=DEFAULT_URL,
    show_default=True,
    help="The gateway's base URL [OSHEPHERD_URL].",
)
KEY = click.option(
    "--key", envvar="OLLAMA_API_KEY", help="An admin API key, once keys exist [OLLAMA_API_KEY]."
)


class GatewayError(click.ClickException):
    """The gateway could not be asked, or refused: one line, exit 1."""


def _client(url: str, key: str | None) -> httpx.Client:
    """A client of the gateway at ``url``; raises ``GatewayError`` for a malformed URL."""
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    with _asking(url):
        return httpx.Client(base_url=url.rstrip("/"), headers=headers, timeout=TIMEOUT)


@contextmanager
def _asking(url: str) -> Iterator[None]:
    """httpx's errors as a ``GatewayError`` naming ``url``."""
    try:
        yield
    except httpx.TransportError as exc:
        reason = str(exc) or type(exc).__name__
        raise GatewayError(f"cannot reach the gateway at {url}: {reason}") from exc
    except httpx.InvalidURL as exc:
        raise GatewayError(f"invalid gateway URL {url!r}: {exc}") from exc


def _refusal(url: str, response: httpx.Response) -> GatewayError:
    """The one line that says why ``response`` (an HTTP error) answered nothing useful."""
    try:
        body = response.json()
        message = str(body.get("error", body)) if isinstance(body, dict) else str(body)
    except ValueError:
        message = response.text.strip()[:200] or response.reason_phrase
    status = response.status_code
    if status in (401, 403):
        return GatewayError(f"{url} refused the key ({status}): {message}")
    if status == 404 and response.request.url.path == FLEET_PATH:
        return GatewayError(f"{url} has no fleet API: is it an oshepherd gateway?")
    return GatewayError(f"{url} answered {status}: {message}")


def fetch_fleet(client: httpx.Client, url: str) -> dict[str, Any]:
    """``GET /oshepherd/v1/fleet``; raises ``GatewayError``."""
    with _asking(url):
        response = client.get(FLEET_PATH)
    if response.status_code != 200:
        raise _refusal(url, response)
    try:
        fleet: dict[str, Any] = response.json()
    except ValueError as exc:
        raise GatewayError(f"{url} answered no JSON: is it an oshepherd gateway?") from exc
    return fleet


@click.command("status")
@URL
@KEY
@click.option(
    "--watch",
    type=click.FloatRange(min=0.2),
    is_flag=False,
    flag_value=2.0,
    default=None,
    metavar="[SECONDS]",
    help="Refresh every SECONDS (default 2) until Ctrl-C.",
)
@click.option("--json", "as_json", is_flag=True, help="Print the fleet as JSON, for scripts.")
def status(url: str, key: str | None, watch: float | None, as_json: bool) -> None:
    """The fleet: workers, queues and throughput (GET /oshepherd/v1/fleet)."""
    with _client(url, key) as client:
        fleet = fetch_fleet(client, url)
        if as_json:
            click.echo(json.dumps(fleet, indent=2))
            return
        console = _console()
        if watch is None:
            console.print(render(fleet, url))
            return
        # Ctrl-C (or SIGTERM) ends the watch between two refreshes, never inside one; and
        # even when the shell started this command with SIGINT ignored.
        stop = threading.Event()
        previous = {sig: signal.signal(sig, lambda *_: stop.set()) for sig in STOP_SIGNALS}
        try:
            with Live(render(fleet, url), console=console, auto_refresh=False) as live:
                while not stop.wait(watch):
                    view: Group | Text
                    try:
                        view = render(fetch_fleet(client, url), url)
                    except GatewayError as exc:  # keep watching: it may come back
                        view = Text(f"{exc.message} (retrying every {watch:g}s)", style="red")
                    live.update(view, refresh=True)
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)


def _console() -> rich.console.Console:
    console = rich.console.Console()
    return console if console.is_terminal else rich.console.Console(width=TABLE_WIDTH)


def render(fleet: dict[str, Any], url: str) -> Group:
    """The three tables of ``oshepherd status`` for a ``/oshepherd/v1/fleet`` answer."""
    return Group(_workers(fleet["workers"], url), _queues(fleet["queues"]), _rates(fleet))


def _workers(workers: list[dict[str, Any]], url: str) -> rich.table.Table:
    title = f"{len(workers)} worker(s) at {url}"
    table = rich.table.Table("worker", "host", "ollama", "health", "slots busy", "models",
                             "loaded", "seen", title=title, title_justify="left")  # fmt: skip
    now = time.time()
    for w in workers:
        health = Text("ok", "green") if w["healthy"] else Text(w["error"] or "unhealthy", "red")
        seen = f"{max(now - w['last_seen'], 0):.0f}s ago" if w["last_seen"] else "-"
        table.add_row(
            w["id"], w["hostname"], w["version"], health, f"{w['in_flight']}/{w['slots']}",
            ", ".join(w["models"]) or "-", ", ".join(w["loaded"]) or "-", seen,
        )  # fmt: skip
    return table


def _queues(queues: list[dict[str, Any]]) -> rich.table.Table:
    table = rich.table.Table("model", "high", "normal", "low", "oldest wait", title="queues",
                             title_justify="left")  # fmt: skip
    by_model: dict[str, dict[str, dict[str, Any]]] = {}
    for row in queues:
        by_model.setdefault(row["model"], {})[row["priority"]] = row
    for model, rows in by_model.items():
        waits = [r["oldest_wait"] for r in rows.values() if r["oldest_wait"] is not None]
        depths = [str(rows[level]["depth"]) if level in rows else "-" for level in LEVELS]
        table.add_row(model, *depths, f"{max(waits):.1f}s" if waits else "-")
    return table


def _rates(fleet: dict[str, Any]) -> rich.table.Table:
    rates = fleet["throughput"]
    table = rich.table.Table("model", "requests/s", "prompt tokens/s", "completion tokens/s",
                             title=f"throughput, last {rates['window']}s",
                             title_justify="left")  # fmt: skip
    for row in [*rates["models"], {"model": "all", **rates}]:
        table.add_row(
            row["model"],
            f"{row['requests_per_second']:.2f}",
            f"{row['prompt_tokens_per_second']:.1f}",
            f"{row['completion_tokens_per_second']:.1f}",
        )
    return table


@click.command("pull")
@click.argument("model")
@URL
@KEY
def pull(model: str, url: str, key: str | None) -> None:
    """Pull MODEL on every healthy host of the fleet (POST /api/pull), with a bar per host
    and one for the total; exits 1 naming the hosts that failed."""
    bars = PullBars(_console())
    body = {"model": model}
    with (
        _client(url, key) as client,
        _asking(url),
        client.stream("POST", "/api/pull", json=body) as answer,
    ):
        if answer.status_code != 200:
            answer.read()
            raise _refusal(url, answer)
        with bars.progress:  # drawn once the gateway answers
            for raw in answer.iter_lines():
                if raw.strip():
                    bars.line(_object(raw))
    if bars.failed:
        where = "; ".join(f"{host}: {error}" for host, error in sorted(bars.failed.items()))
        raise GatewayError(f"pull of {model} failed on {', '.join(sorted(bars.failed))} ({where})")
    if bars.error:
        raise GatewayError(bars.error)
    # A stream that names no worker came from one Ollama host, not a gateway.
    click.echo(f"pulled {model} on {len(bars.hosts)} host(s)" if bars.hosts else f"pulled {model}")


def _object(raw: str) -> dict[str, Any]:
    """A line of the pull stream; any other text is its error."""
    try:
        value = json.loads(raw)
    except ValueError:
        value = None
    return value if isinstance(value, dict) else {"error": raw.strip()}


class PullBars:
    """Bars for a merged pull stream (``oshepherd.api.fanout``): one per host from the lines'
    ``worker``, ``worker_total`` and ``worker_completed`` per layer, and the total from
    their ``total`` and ``completed``. ``failed`` and ``error`` come from the last line."""

    def __init__(self, console: rich.console.Console) -> None:
        self.progress = rich.progress.Progress(
            rich.progress.TextColumn("{task.description}"),
            rich.progress.BarColumn(),
            rich.progress.DownloadColumn(),
            rich.progress.TransferSpeedColumn(),
            console=console,
        )
        self._total = self.progress.add_task("total", total=None)
        self.hosts: dict[str, rich.progress.TaskID] = {}
        self._layers: dict[str, dict[str, tuple[int, int]]] = {}  # host: digest: sizes
        self._fleet: dict[str, tuple[int, int]] = {}  # digest: merged sizes
        self.failed: dict[str, str] = {}
        self.error = ""

    def line(self, line: dict[str, Any]) -> None:
        """Take one line of the stream."""
        if "error" in line:
            self.error = str(line["error"])
            self.failed = {str(h): str(e) for h, e in (line.get("failed") or {}).items()}
            for host, error in self.failed.items():
                task = self._host(host)
                self.progress.update(task, description=f"[red]{host}: {error}")
            return
        digest, host = str(line.get("digest") or ""), str(line.get("worker") or "")
        if digest and host:
            self._fleet[digest] = (int(line.get("total", 0)), int(line.get("completed", 0)))
            sizes = (int(line.get("worker_total", 0)), int(line.get("worker_completed", 0)))
            self._layers.setdefault(host, {})[digest] = sizes
            layers = self._layers[host].values()
            self.progress.update(
                self._host(host),
                total=sum(t for t, _ in layers),
                completed=sum(c for _, c in layers),
            )
        totals = self._fleet.values()
        if totals:
            self.progress.update(
                self._total,
                total=sum(t for t, _ in totals),
                completed=sum(c for _, c in totals),
            )
        status = str(line.get("status", ""))
        if status and not digest:
            self.progress.update(self._total, description=f"total: {status}")

    def _host(self, host: str) -> rich.progress.TaskID:
        if host not in self.hosts:
            self.hosts[host] = self.progress.add_task(host, total=None)
        return self.hosts[host]
