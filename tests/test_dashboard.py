"""The web dashboard (/oshepherd/) in a real headless browser, Debian's chromium driven by
selenium through chromedriver (both from apt: ``make test`` installs them), against a real
fleet: two workers, one of them with a single slot whose queue fills while it is busy.

Without chromium these tests fail; OSHEPHERD_SKIP_BROWSER=1 skips them instead (for a
developer's machine without it; never set in CI)."""

from __future__ import annotations

import os
import shutil
import threading
from collections.abc import Iterator
from typing import IO

import httpx
import pytest
import redis
from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By

from oshepherd.keys import KeyStore
from oshepherd.redis_server import EmbeddedRedis
from oshepherd.stack import wait_until
from oshepherd.testing.fleet import Fleet
from oshepherd.testing.standin import StandIn
from tests.conftest import busy_and_other

pytestmark = [pytest.mark.slow, pytest.mark.timeout(90)]

CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"
# One table's rows as {row key: {cell field: text}}, read in one go in the page (no stale
# elements while the page redraws).
ROWS_JS = """
const [table, key] = arguments;
const rows = document.querySelectorAll(`#${table} tbody tr[data-${key}]`);
return Object.fromEntries([...rows].map((tr) => [tr.dataset[key],
    Object.fromEntries([...tr.cells].map((td) => [td.dataset.field, td.textContent]))]));
"""
Rows = dict[str, dict[str, str]]


@pytest.fixture(scope="module")
def fleet(redis_server: EmbeddedRedis, stack_log: IO[bytes]) -> Iterator[Fleet]:
    with busy_and_other(redis_server, stack_log) as fleet:
        yield fleet


@pytest.fixture(scope="module")
def browser() -> Iterator[webdriver.Chrome]:
    """Headless chromium; fails when it is missing (skips with OSHEPHERD_SKIP_BROWSER=1)."""
    missing = [path for path in (CHROMIUM, CHROMEDRIVER) if shutil.which(path) is None]
    if missing:
        message = f"{', '.join(missing)} missing: apt-get install -y chromium chromium-driver"
        if os.environ.get("OSHEPHERD_SKIP_BROWSER") == "1":
            pytest.skip(message)
        pytest.fail(message)
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for argument in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage",
                     "--disable-gpu", "--window-size=1366,768"):  # fmt: skip
        options.add_argument(argument)
    driver = webdriver.Chrome(options=options, service=Service(executable_path=CHROMEDRIVER))
    try:
        yield driver
    finally:
        driver.quit()


def rows(browser: webdriver.Chrome, table: str, key: str) -> Rows:
    found: Rows = browser.execute_script(ROWS_JS, table, key)
    return found


def open_page(browser: webdriver.Chrome, url: str) -> None:
    """Load ``url`` in a tab that has no key stored yet (sessionStorage is per origin)."""
    browser.get(url.partition("/oshepherd/")[0] + "/oshepherd/assets/dashboard.css")
    browser.execute_script("sessionStorage.clear()")
    browser.get(url)


def generate(fleet: Fleet, answers: list[int]) -> threading.Thread:
    def run() -> None:
        body = {"model": "llama3", "prompt": "hi", "stream": False}
        url = fleet.url + "/api/generate"
        answers.append(httpx.post(url, json=body, timeout=30).status_code)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread


def test_the_page_shows_both_workers_and_a_queue_rising_and_falling(
    fleet: Fleet, browser: webdriver.Chrome
) -> None:
    open_page(browser, fleet.url + "/oshepherd/")
    wait_until(lambda: rows(browser, "workers", "worker").keys() == {"busy", "other"}, 10, "both")
    workers = rows(browser, "workers", "worker")
    assert workers["busy"]["slots"] == "0 / 1" and workers["other"]["slots"] == "0 / 4"
    assert workers["busy"]["models"] == "llama3:latest" and workers["busy"]["health"] == "healthy"
    assert browser.find_element(By.CSS_SELECTOR, "#workers th").get_attribute("scope") == "col"

    def llama3() -> dict[str, str]:
        return rows(browser, "queues", "model").get("llama3:latest", {})

    assert llama3()["waiting"] == "0"
    answers: list[int] = []
    host: StandIn = fleet.standins[0]
    threads = [generate(fleet, answers)]
    wait_until(lambda: host.active == 1 or answers, 10, "one job running")
    assert not answers, answers
    threads += [generate(fleet, answers) for _ in range(3)]
    wait_until(lambda: llama3().get("waiting") == "3", 5, "3 jobs waiting")
    risen = llama3()
    assert risen["normal"] == "3" and risen["high"] == "0" and risen["oldest"] != "–"
    wait_until(lambda: rows(browser, "workers", "worker")["busy"]["slots"] == "1 / 1", 3, "busy")
    wait_until(lambda: llama3().get("waiting") == "0", 10, "the queue emptied on the page")
    for thread in threads:
        thread.join(10)
    assert answers == [200] * 4

    def timed() -> dict[str, str]:
        return rows(browser, "models", "model").get("llama3:latest", {})

    wait_until(lambda: timed().get("timed") == "4", 5, "the 4 requests timed on the page")
    model = timed()
    assert model["p50"].endswith(" s") and float(model["rps"]) > 0
    summary = browser.find_element(By.CSS_SELECTOR, '#summary [data-field="workers"]').text
    assert summary == "2 / 2"


def test_the_page_is_open_and_asks_for_an_admin_key(
    fleet: Fleet, browser: webdriver.Chrome
) -> None:
    with redis.Redis.from_url(fleet.stack.redis_url) as client:
        store = KeyStore(client)
        admin, _ = store.create({"name": "admin", "scope": "admin"})
        user, _ = store.create({"name": "user", "scope": "user"})
    ttft = fleet.url + "/oshepherd/v1/ttft"
    wait_until(lambda: httpx.get(ttft).status_code == 401, 5, "keys on")
    assert httpx.get(fleet.url + "/oshepherd/").status_code == 200
    assert httpx.get(fleet.url + "/oshepherd/assets/dashboard.js").status_code == 200
    reading = httpx.get(ttft, headers={"x-api-key": admin}).json()
    assert reading["enabled"] is True and set(reading) == {"process", "enabled", "models"}
    llama3 = next(m for m in reading["models"] if m["model"] == "llama3:latest")
    assert llama3["count"] == 4 and llama3["buckets"][-1] == [None, 4] and llama3["sum"] > 4

    open_page(browser, fleet.url + "/oshepherd/")
    form = browser.find_element(By.ID, "key-form")
    wait_until(form.is_displayed, 5, "the key form")
    assert rows(browser, "workers", "worker") == {}

    def give(secret: str) -> None:
        browser.find_element(By.ID, "key").send_keys(secret)
        browser.find_element(By.CSS_SELECTOR, "#key-form button").click()

    give(user)
    wait_until(
        lambda: form.is_displayed() and "admin" in browser.find_element(By.ID, "key-reason").text,
        5,
        "a user key refused",
    )
    give(admin)
    wait_until(lambda: len(rows(browser, "workers", "worker")) == 2, 5, "workers with the key")
    assert not form.is_displayed()
    assert browser.execute_script("return sessionStorage.getItem('oshepherd.key')") == admin

    open_page(browser, fleet.url + f"/oshepherd/#key={admin}")
    wait_until(lambda: len(rows(browser, "workers", "worker")) == 2, 5, "workers by #key=")
    assert browser.current_url == fleet.url + "/oshepherd/"
