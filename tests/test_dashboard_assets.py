"""The dashboard's page and assets are served from the package and need no key; its data
routes do (before the key table is read, the gateway fails closed on them)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from starlette.testclient import TestClient

from oshepherd.api.app import create_app
from oshepherd.config import ApiSettings


@pytest.fixture(scope="module")
def client() -> Iterator[TestClient]:
    """The app without its lifespan: no Redis, the key table never read."""
    yield TestClient(create_app(ApiSettings()), base_url="http://127.0.0.1:5001")


@pytest.mark.parametrize(
    ("path", "kind"),
    [
        ("/oshepherd/", "text/html"),
        ("/oshepherd/assets/dashboard.js", "text/javascript"),
        ("/oshepherd/assets/dashboard.css", "text/css"),
    ],
)
def test_the_page_and_its_assets_need_no_key(client: TestClient, path: str, kind: str) -> None:
    answer = client.get(path)
    assert answer.status_code == 200 and answer.headers["content-type"].startswith(kind)
    assert client.head(path).status_code == 200


def test_the_page_names_only_its_own_assets(client: TestClient) -> None:
    page = client.get("/oshepherd/").text
    assert 'src="assets/dashboard.js"' in page and 'href="assets/dashboard.css"' in page
    assert "http://" not in page and "https://" not in page  # nothing from elsewhere


def test_without_the_slash_is_a_redirect(client: TestClient) -> None:
    answer = client.get("/oshepherd", follow_redirects=False)
    assert answer.status_code == 307 and answer.headers["location"].endswith("/oshepherd/")


@pytest.mark.parametrize("path", ["/oshepherd/v1/ttft", "/oshepherd/v1/fleet"])
def test_its_data_routes_are_not_open(client: TestClient, path: str) -> None:
    answer = client.get(path)
    assert answer.status_code == 503 and answer.json()["code"] == "keys_unavailable"


def test_nothing_outside_the_assets_is_served(client: TestClient) -> None:
    assert client.get("/oshepherd/assets/%2e%2e/index.html").status_code == 404
    assert client.post("/oshepherd/assets/dashboard.js").status_code == 503
