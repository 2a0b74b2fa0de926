"""The QC page in a real headless browser (Debian's Chromium + chromedriver, driven by Selenium).

It loads from disk with no network, lists every subject with its thumbnail, sorts, and a
pass/fail click is persisted: in localStorage across reloads, in the downloaded qc.json, and,
when served by `qc-serve`, straight into the derivative's qc/qc.json; batch and study-report
then read the marks.
"""

import csv
import json
import os
import re
import shutil
import threading
import time
from pathlib import Path

import pytest

from conftest import require_module, require_path
from study_common import SUBJECTS, batch, run_cli

pytestmark = pytest.mark.slow  # a real browser, and a batch over the shared subjects

CHROMIUM = Path(os.environ.get("CHROMIUM", "/usr/bin/chromium"))
CHROMEDRIVER = Path(os.environ.get("CHROMEDRIVER", "/usr/bin/chromedriver"))
KEYS = [f"{s}_T2w" for s in SUBJECTS]


def _need_browser():
    """Chromium, chromedriver and selenium, or skip (fail in CI): scripts/test.sh installs them."""
    for path in (CHROMIUM, CHROMEDRIVER):
        require_path(path, "the QC-page browser test; scripts/test.sh installs it")
    require_module("selenium", "the QC-page browser test")


@pytest.fixture(scope="module")
def study(tmp_path_factory, mri_bids):
    deriv = tmp_path_factory.mktemp("qcstudy") / "deriv"
    assert batch(mri_bids, deriv) == 0
    return deriv


@pytest.fixture
def browser(tmp_path):
    _need_browser()
    os.environ.setdefault("SE_OFFLINE", "true")  # never let Selenium Manager download a driver
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    downloads = tmp_path / "downloads"
    downloads.mkdir()
    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--disable-dev-shm-usage", f"--user-data-dir={tmp_path / 'profile'}",
                 "--window-size=1200,900"):
        options.add_argument(flag)
    options.add_experimental_option("prefs", {"download.default_directory": str(downloads),
                                              "download.prompt_for_download": False})
    driver = webdriver.Chrome(options=options, service=Service(executable_path=str(CHROMEDRIVER)))
    driver.execute_cdp_cmd("Browser.setDownloadBehavior",
                           {"behavior": "allow", "downloadPath": str(downloads)})
    driver.downloads = downloads
    yield driver
    driver.quit()


def wait_for(condition, timeout=20.0, what="condition"):
    end = time.time() + timeout
    while time.time() < end:
        try:
            value = condition()
        except Exception:  # e.g. a stale element while the page re-renders
            value = None
        if value:
            return value
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


def loaded(driver):
    """Cards of a freshly (re)loaded page."""
    wait_for(lambda: driver.execute_script("return document.readyState") == "complete", what="page load")
    return wait_for(lambda: len(cards(driver)) == 4 and cards(driver), what="4 cards")


def cards(driver):
    from selenium.webdriver.common.by import By

    return driver.find_elements(By.CSS_SELECTOR, "#cards .card")


def click(driver, key, mark):
    from selenium.webdriver.common.by import By

    driver.find_element(By.CSS_SELECTOR, f'.card[data-key="{key}"] button[data-mark="{mark}"]').click()


def test_page_is_self_contained(study):
    page = (study / "qc" / "index.html").read_text()
    assert not re.search(r"""(src|href)\s*=\s*["']?(https?:)?//""", page)
    assert "@import" not in page and "<link" not in page
    assert page.count("data:image/jpeg;base64,") == 4
    assert len(page) < 40_000 * 4 + 20_000  # small thumbnails: a study of thousands stays usable


def test_qc_page_lists_subjects_and_persists_marks(study, browser, mri_bids):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select

    browser.get((study / "qc" / "index.html").as_uri())
    loaded(browser)
    assert sorted(c.get_attribute("data-key") for c in cards(browser)) == KEYS
    for image in browser.find_elements(By.CSS_SELECTOR, "#cards img"):
        assert image.get_attribute("src").startswith("data:image/jpeg;base64,")
        assert browser.execute_script("return arguments[0].naturalWidth", image) > 50
    # Lowest confidence first: the order of the records' minimum confidences.
    Select(browser.find_element(By.ID, "sort")).select_by_value("confidence")
    lowest = {}
    for key in KEYS:
        sub = key.split("_")[0]
        record = json.loads((study / sub / "anat" / f"{key}_discs.json").read_text())
        lowest[key] = min(d["confidence"] for d in record["discs"])
    expected = sorted(KEYS, key=lambda k: (round(lowest[k], 3), k))  # the page shows 3 decimals
    assert [c.get_attribute("data-key") for c in cards(browser)] == expected
    # Needs attention first (default): the small crop has the most flagged discs.
    Select(browser.find_element(By.ID, "sort")).select_by_value("attention")
    assert cards(browser)[0].get_attribute("data-key") == "sub-sctcrop_T2w"

    click(browser, "sub-sctcrop_T2w", "fail")
    click(browser, "sub-errsm18_T2w", "pass")
    # The page re-renders after a click: wait for it (a busy machine may take a moment).
    wait_for(lambda: "fail" in browser.find_element(By.CSS_SELECTOR, '.card[data-key="sub-sctcrop_T2w"]')
             .get_attribute("class"), what="the fail mark on the card")
    wait_for(lambda: "1 pass, 1 fail, 2 to review" in browser.find_element(By.ID, "counts").text, what="the counts")

    browser.refresh()  # kept in localStorage
    loaded(browser)
    assert "fail" in browser.find_element(By.CSS_SELECTOR, '.card[data-key="sub-sctcrop_T2w"]').get_attribute("class")

    browser.find_element(By.ID, "save").click()
    saved = browser.downloads / "qc.json"
    wait_for(saved.exists, what="downloaded qc.json")
    data = json.loads(wait_for(lambda: saved.read_text() or None, what="qc.json content"))
    assert {k: v["status"] for k, v in data["marks"].items()} == \
        {"sub-sctcrop_T2w": "fail", "sub-errsm18_T2w": "pass"}

    # The commands read the marks once qc.json is in the derivative's qc/ folder.
    shutil.copy(saved, study / "qc" / "qc.json")
    assert run_cli("study-report", "--bids", mri_bids, "--out", study) == 0
    with open(study / "discs.csv") as handle:
        qc = {r["subject"]: r["qc"] for r in csv.DictReader(handle)}
    assert qc == {"sub-errsm18": "pass", "sub-errsm20": "", "sub-errsm22": "", "sub-sctcrop": "fail"}
    assert batch(mri_bids, study) == 0
    assert "QC marked fail (1): sub-sctcrop_T2w" in (study / "batch.log").read_text()
    # The regenerated page shows the saved marks in a fresh browser profile too.
    browser.execute_script("localStorage.clear()")
    browser.refresh()
    loaded(browser)
    assert "pass" in browser.find_element(By.CSS_SELECTOR, '.card[data-key="sub-errsm18_T2w"]').get_attribute("class")


def test_served_page_saves_into_the_derivative(study, browser):
    from selenium.webdriver.common.by import By

    from VertebralLabelingLib.study.qc_report import make_server

    target = study / "qc" / "qc.json"
    if target.exists():
        target.unlink()
    server = make_server(study, port=0)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        browser.get(f"http://127.0.0.1:{server.server_address[1]}/")
        loaded(browser)
        click(browser, "sub-errsm20_T2w", "fail")
        browser.find_element(By.ID, "save").click()
        wait_for(target.exists, what="qc.json written by the server")
        marks = json.loads(target.read_text())["marks"]
        assert marks["sub-errsm20_T2w"]["status"] == "fail"
        assert "saved to the derivative folder" in browser.find_element(By.ID, "saved").text
        assert not list(browser.downloads.iterdir())  # no download needed
    finally:
        server.shutdown()
        server.server_close()


def test_server_writes_only_valid_qc_json(study):
    import urllib.error
    import urllib.request

    from VertebralLabelingLib.study.qc_report import make_server

    server = make_server(study, port=0)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    base = f"http://127.0.0.1:{server.server_address[1]}"
    target = study / "qc" / "qc.json"
    before = target.read_bytes() if target.exists() else None
    try:
        for path, body, code in (("/qc.json", b"not json", 400), ("/qc.json", b'{"no": "marks"}', 400),
                                 ("/other.json", b'{"marks": {}}', 404)):
            request = urllib.request.Request(base + path, data=body, method="POST", headers={
                "X-QC-Token": server.token, "Content-Type": "application/json"})
            with pytest.raises(urllib.error.HTTPError) as error:
                urllib.request.urlopen(request, timeout=10)
            assert error.value.code == code
        with pytest.raises(urllib.error.HTTPError) as error:
            urllib.request.urlopen(base + "/../dataset_description.json", timeout=10)
        assert error.value.code == 404
        assert (target.read_bytes() if target.exists() else None) == before
        with urllib.request.urlopen(base + "/", timeout=10) as page:
            assert b"qc-data" in page.read()
    finally:
        server.shutdown()
        server.server_close()
