"""The host check, as Ollama's ``allowedHostsMiddleware`` (server/routes.go): with the API on
a loopback address, a request whose Host is not local gets 403 and nothing runs."""

from __future__ import annotations

import socket
from collections.abc import Callable, Iterator

import httpx
import psutil
import pytest

from oshepherd.api.protections import allowed_host, is_local_address, listens_on_loopback
from oshepherd.testing.fleet import Fleet
from oshepherd.testing.standin import StandIn

GOOD = {"model": "llama3", "prompt": "hi", "stream": False}


@pytest.mark.parametrize(
    "host",
    ["", "localhost", "LOCALHOST", "app.localhost", "printer.local", "db.internal"],
)
def test_local_names_are_allowed(host: str) -> None:
    assert allowed_host(host)


def test_the_machines_own_hostname_is_allowed() -> None:
    assert allowed_host(socket.gethostname().upper())


@pytest.mark.parametrize(
    "host", ["rebind.example", "localhost.example", "local", "evil.com", "[::1]", "localhost."]
)
def test_other_names_are_not(host: str) -> None:
    assert not allowed_host(host)


LOCAL_ADDRESSES = ["127.0.0.1", "127.8.9.10", "::1", "::ffff:127.0.0.1", "0.0.0.0", "::"]
PRIVATE_ADDRESSES = ["10.1.2.3", "172.16.0.1", "192.168.1.2", "fd00::1"]


@pytest.mark.parametrize("address", [*LOCAL_ADDRESSES, *PRIVATE_ADDRESSES])
def test_loopback_private_and_unspecified_addresses_are_local(address: str) -> None:
    assert is_local_address(address)


def test_the_machines_own_addresses_are_local() -> None:
    own = [
        entry.address.partition("%")[0]
        for entries in psutil.net_if_addrs().values()
        for entry in entries
        if entry.family in (socket.AF_INET, socket.AF_INET6)
    ]
    assert own and all(is_local_address(address) for address in own)


@pytest.mark.parametrize("address", ["8.8.8.8", "169.254.1.1", "2001:4860::8888", "localhost"])
def test_public_and_link_local_addresses_and_names_are_not(address: str) -> None:
    assert not is_local_address(address)


@pytest.mark.parametrize(
    ("host", "loopback"),
    [("127.0.0.1", True), ("::1", True), ("localhost", True), ("0.0.0.0", False), ("", False)],
)
def test_which_listen_addresses_are_loopback(host: str, loopback: bool) -> None:
    assert listens_on_loopback(host) is loopback


@pytest.fixture
def fleet(make_fleet: Callable[[], Fleet]) -> Iterator[tuple[Fleet, StandIn]]:
    fleet = make_fleet()
    host = fleet.standin("llama3")
    fleet.worker(host)
    yield fleet, host


def serve(fleet: Fleet, host: StandIn, listen: str) -> str:
    fleet.start_api(host=listen)
    fleet.wait_for_models("llama3:latest")
    return fleet.url


def generate(url: str, host_header: str, method: str = "POST") -> httpx.Response:
    return httpx.request(method, url + "/api/generate", json=GOOD, headers={"Host": host_header})


@pytest.mark.slow
def test_on_loopback_a_foreign_host_gets_403_and_nothing_runs(
    fleet: tuple[Fleet, StandIn],
) -> None:
    url = serve(*fleet, "127.0.0.1")
    port = httpx.URL(url).port
    refused = generate(url, "rebind.example")
    assert refused.status_code == 403 and refused.content == b""
    assert generate(url, f"rebind.example:{port}").status_code == 403
    assert httpx.get(url + "/api/tags", headers={"Host": "rebind.example"}).status_code == 403
    for local in (f"localhost:{port}", f"127.0.0.1:{port}", "app.localhost", "[::1]:80"):
        assert generate(url, local).status_code == 200, local
    posts = [path for method, path, _ in fleet[1].requests if method == "POST"]
    assert posts == ["/api/generate"] * 4


@pytest.mark.slow
def test_an_options_to_a_local_name_gets_204(fleet: tuple[Fleet, StandIn]) -> None:
    url = serve(*fleet, "127.0.0.1")
    allowed = generate(url, f"localhost:{httpx.URL(url).port}", "OPTIONS")
    assert allowed.status_code == 204 and allowed.content == b""
    assert generate(url, "rebind.example", "OPTIONS").status_code == 403


@pytest.mark.slow
def test_on_every_interface_any_host_is_served(fleet: tuple[Fleet, StandIn]) -> None:
    url = serve(*fleet, "0.0.0.0")
    assert generate(url, "rebind.example").status_code == 200
