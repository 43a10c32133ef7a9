"""The dashboard in a real browser: Debian's headless Chromium, driven through its
chromedriver by Selenium, against a real gunicorn gateway and the fake Ollama.

Nothing is downloaded at run time: the browser and driver are Debian's packages
(.ci/run installs them). Without them the test is skipped locally and fails under CI
(CI=true), as the PostgreSQL half of the suite does. Screenshots of every page are
saved to tests/artifacts/ui/ (or $OLLAMA_GW_TEST_ARTIFACTS/ui/).
"""
import os
import shutil
from pathlib import Path

import pytest
import requests

from tests import leak_check
from tests.gateway_process import GatewayProcess, wait_for

pytestmark = pytest.mark.gateway

CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"
GENERATE = {"model": "llama3.2", "prompt": "hi", "stream": False}
ARTIFACTS = Path(os.environ.get("OLLAMA_GW_TEST_ARTIFACTS")
                 or Path(__file__).resolve().parent.parent / "artifacts") / "ui"
WAIT = 30  # seconds a page or a condition gets on a busy shared machine


@pytest.fixture
def browser(tmp_path):
    if not (shutil.which(CHROMIUM) and shutil.which(CHROMEDRIVER)):
        if os.environ.get("CI"):
            pytest.fail(f"{CHROMIUM} and {CHROMEDRIVER} are needed (apt-get install chromium "
                        "chromium-driver)")
        pytest.skip("chromium and chromium-driver are not installed")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for argument in ("--headless=new", "--no-sandbox", "--disable-gpu",
                     "--disable-dev-shm-usage", "--window-size=1400,1100",
                     f"--user-data-dir={tmp_path / 'chromium'}"):
        options.add_argument(argument)
    service = Service(CHROMEDRIVER, log_output=str(tmp_path / "chromedriver.log"))
    driver = webdriver.Chrome(service=service, options=options)
    driver.set_page_load_timeout(WAIT)
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    try:
        yield driver
    finally:
        driver.quit()


def bearer(key):
    return {"Authorization": f"Bearer {key}"}


def generate(gw, key):
    return requests.post(gw.url + "/api/generate", json=GENERATE, headers=bearer(key),
                         timeout=30)


class Page:
    """The browser on the gateway's dashboard: open pages, fill forms, take screenshots."""

    def __init__(self, driver, gw):
        self.driver, self.gw = driver, gw

    def open(self, path):
        self.driver.get(self.gw.url + path)
        self.wait_for_load()

    def wait_for_load(self):
        assert wait_for(lambda: self.driver.execute_script(
            "return document.readyState") == "complete", WAIT)

    def find(self, css):
        from selenium.webdriver.common.by import By

        return self.driver.find_element(By.CSS_SELECTOR, css)

    def has(self, css):
        from selenium.webdriver.common.by import By

        return bool(self.driver.find_elements(By.CSS_SELECTOR, css))

    def submit(self, css):
        """Click what posts a form or follows a link, and wait for the next page."""
        old = self.find("html")
        self.find(css).click()
        assert wait_for(lambda: self._gone(old), WAIT)
        self.wait_for_load()

    @staticmethod
    def _gone(element):
        """Whether the page that held `element` was replaced.

        Chromium says so as a stale element, or, caught mid-navigation, as an inspector
        error that the node no longer belongs to the document.
        """
        from selenium.common.exceptions import (
            StaleElementReferenceException,
            WebDriverException,
        )

        try:
            return element.tag_name is None
        except StaleElementReferenceException:
            return True
        except WebDriverException as exc:
            if "does not belong to the document" in str(exc):
                return True
            raise

    def shot(self, name):
        self.driver.save_screenshot(str(ARTIFACTS / f"{name}.png"))

    def path(self):
        return self.driver.current_url.removeprefix(self.gw.url)


def drawn_charts(page):
    """Charts whose canvas has painted pixels and whose data has points, by chart name."""
    return page.driver.execute_script("""
        const drawn = {};
        for (const el of document.querySelectorAll('.chart[data-chart]')) {
          const canvas = el.querySelector('canvas');
          if (!canvas) continue;
          const pixels = canvas.getContext('2d').getImageData(
            0, 0, canvas.width, canvas.height).data;
          let painted = 0;
          for (let i = 3; i < pixels.length; i += 4) if (pixels[i]) painted++;
          drawn[el.dataset.chart] = {painted: painted, points: Number(el.dataset.points)};
        }
        return drawn;""")


def test_an_admin_signs_in_sees_charts_manages_a_key_and_signs_out(browser, fake, tmp_path):
    with GatewayProcess(f"sqlite:///{tmp_path}/ui.db", fake.url, workers=2, ui="true",
                        data_dir=str(tmp_path)) as gw:
        gw.start(tmp_path / "gateway.log")
        admin = gw.add_key("--name", "ops", "--role", "admin")["key"]
        for _ in range(5):
            assert generate(gw, admin).status_code == 200
        assert wait_for(lambda: requests.get(gw.url + "/api/stats", headers=bearer(admin),
                                             timeout=10).json()["total_requests"] >= 5, WAIT)
        page = Page(browser, gw)

        page.open("/ui/")
        assert page.path() == "/ui/signin"
        page.shot("01-signin")
        page.find("#key").send_keys(admin)
        page.submit("#signin")
        assert page.path() == "/ui/", browser.page_source
        assert wait_for(lambda: len(drawn_charts(page)) == 5, WAIT)
        charts = drawn_charts(page)
        assert all(chart["painted"] > 0 for chart in charts.values()), charts
        assert charts["requests"]["points"] > 0 and charts["tokens"]["points"] > 0, charts
        assert page.find("#total-requests").text.isdigit()
        assert "healthy" in page.find("#upstreams").text
        page.shot("02-overview")

        page.open("/ui/keys")
        page.find("#field-name").send_keys("made in a browser")
        page.find("input[name=rate_limit]").send_keys("100/minute")
        page.submit("#create")
        secret = page.find("#secret").text
        assert secret.startswith("ogw_")
        leak_check.remember_secrets([secret])  # made in the gateway: the final check looks too
        page.find("#copy").click()
        assert wait_for(lambda: page.find("#copy").text == "Copied", WAIT)
        page.shot("03-key-created")
        assert generate(gw, secret).status_code == 200

        page.submit("#to-key")
        assert secret not in browser.page_source
        page.shot("04-key")
        page.submit("#revoke")
        page.shot("05-revoke-confirm")
        page.submit("#confirm")
        assert page.find("#key-status").text == "revoked"
        assert wait_for(lambda: generate(gw, secret).status_code == 401, WAIT)

        for name, path in (("06-keys", "/ui/keys"), ("07-webhooks", "/ui/webhooks"),
                           ("08-audit", "/ui/audit")):
            page.open(path)
            assert page.path() == path and not page.has(".error")
            page.shot(name)
        assert "key.revoked" in page.find("#audit").text

        page.submit("#signout")
        assert page.path() == "/ui/signin"
        page.open("/ui/keys")
        assert page.path() == "/ui/signin"
    assert admin not in gw.log() and secret not in gw.log()


def test_a_key_holder_sees_only_their_own_usage_and_limits(browser, fake, tmp_path):
    with GatewayProcess(f"sqlite:///{tmp_path}/ui.db", fake.url, workers=1, ui="true",
                        data_dir=str(tmp_path)) as gw:
        gw.start(tmp_path / "gateway.log")
        user = gw.add_key("--name", "alice", "--rate-limit", "50/hour")
        assert generate(gw, user["key"]).status_code == 200
        page = Page(browser, gw)
        page.open("/ui/signin")
        page.find("#key").send_keys(user["key"])
        page.submit("#signin")
        assert page.path() == f"/ui/keys/{user['id']}"
        assert "requests this window" in page.find("#limits").text
        assert not page.has("#edit-key") and not page.has("#revoke")
        page.shot("09-user-key")
        page.open("/ui/keys")
        assert "needs an admin key" in page.find(".error").text
