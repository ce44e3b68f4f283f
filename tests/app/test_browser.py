"""The workbench in a real headless Chromium (Debian ``chromium`` + ``chromium-driver``,
driven by Selenium): log in, open the queue, review a part with the keyboard, draw a mask
stroke, go to the next part, and check the database rows. Screenshots go to
``DEFECTLAB_SCREENSHOTS`` when it is set."""

from __future__ import annotations

import os
import shutil
import socket
import threading
import time
from pathlib import Path

import cv2
import pytest
from sqlalchemy import select

from defectlab.app.db import Inspection, Review
from defectlab.app.ingest import ingest_folder, register_version
from defectlab.app.web import create_app

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
DRIVER = shutil.which("chromedriver")


def _browser_or_skip() -> None:
    if CHROMIUM and DRIVER:
        return
    reason = "needs Debian chromium and chromium-driver (apt-get install chromium chromium-driver)"
    if os.environ.get("CI") == "true":
        pytest.fail(f"CI must run the browser test: {reason}")
    pytest.skip(reason)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def server(tmp_path: Path, trained_run: Path, parts):
    import uvicorn

    _browser_or_skip()
    app = create_app(f"sqlite:///{tmp_path / 'wb.db'}", run=trained_run, files=tmp_path / "files")
    wb = app.state.workbench
    ingest_folder(wb.db, register_version(wb.db, trained_run), parts[0], wb.files, progress=False)
    port = _free_port()
    config = uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning")
    uv = uvicorn.Server(config)
    thread = threading.Thread(target=uv.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not uv.started and time.monotonic() < deadline:
        time.sleep(0.05)
    assert uv.started
    yield f"http://127.0.0.1:{port}", wb
    uv.should_exit = True
    thread.join(timeout=10)
    wb.db.close()


@pytest.fixture
def browser():
    from selenium import webdriver
    from selenium.webdriver.chrome.options import Options
    from selenium.webdriver.chrome.service import Service

    options = Options()
    options.binary_location = CHROMIUM
    for arg in (
        "--headless=new",
        "--no-sandbox",
        "--disable-dev-shm-usage",
        "--window-size=1400,1000",
    ):
        options.add_argument(arg)
    driver = webdriver.Chrome(service=Service(DRIVER), options=options)
    driver.implicitly_wait(5)
    yield driver
    driver.quit()


def _shot(driver, name: str) -> None:
    folder = os.environ.get("DEFECTLAB_SCREENSHOTS")
    if folder:
        Path(folder).mkdir(parents=True, exist_ok=True)
        driver.save_screenshot(str(Path(folder) / f"{name}.png"))


def _wait_text(driver, element_id: str, words: str, timeout: float = 10) -> str:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as ec
    from selenium.webdriver.support.ui import WebDriverWait

    WebDriverWait(driver, timeout).until(
        ec.text_to_be_present_in_element((By.ID, element_id), words)
    )
    return driver.find_element(By.ID, element_id).text


def test_review_with_the_keyboard_and_a_brush(server, browser) -> None:
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    base, wb = server
    browser.get(base + "/queue")
    assert browser.find_elements(By.ID, "login-link")  # reading is open, writing is not
    browser.get(base + "/login")
    browser.find_element(By.ID, "reviewer-name").send_keys("ana")
    browser.find_element(By.ID, "token").send_keys(wb.first_token)
    browser.find_element(By.ID, "login-form").submit()
    assert _wait_text(browser, "reviewer", "ana") == "ana"
    tiles = browser.find_elements(By.CSS_SELECTOR, "#queue .tile")
    assert tiles, "the flagged queue is empty"
    _shot(browser, "queue")
    first = int(tiles[0].get_attribute("data-inspection"))
    tiles[0].click()
    assert browser.current_url.startswith(f"{base}/review/{first}?")

    body = browser.find_element(By.TAG_NAME, "body")
    body.send_keys("d")
    assert "saved (revision 1)" in _wait_text(browser, "status", "saved")
    with wb.db.sessions() as session:
        inspection = session.get(Inspection, first)
        review = session.scalars(select(Review).where(Review.image_id == inspection.image_id)).one()
    assert (review.verdict, review.reviewer, review.revision) == ("defect", "ana", 1)

    browser.find_element(By.ID, "defect-class").send_keys("blob")
    browser.find_element(By.ID, "v-defect").click()
    _wait_text(browser, "status", "revision 2")

    canvas = browser.find_element(By.ID, "paint")
    width = canvas.size["width"]
    ActionChains(browser).move_to_element_with_offset(
        canvas, -width // 4, 0
    ).click_and_hold().move_by_offset(width // 2, 0).release().perform()
    browser.find_element(By.TAG_NAME, "h1").click()  # focus off the inputs
    browser.find_element(By.TAG_NAME, "body").send_keys("s")
    status = _wait_text(browser, "status", "mask saved")
    assert "revision 3" in status
    _shot(browser, "review")
    with wb.db.sessions() as session:
        review = session.scalars(select(Review).where(Review.image_id == inspection.image_id)).one()
    assert (review.defect_class, review.revision) == ("blob", 3)
    mask = cv2.imread(str(wb.files / review.mask_file), cv2.IMREAD_GRAYSCALE)
    assert mask.shape == (32, 32)
    row = mask[16] > 127  # the stroke crossed the middle from a quarter to three quarters
    assert row[12:20].all() and not mask[:3].any()

    browser.find_element(By.TAG_NAME, "body").send_keys(Keys.ARROW_RIGHT)
    time.sleep(0.5)
    assert f"/review/{first}?" not in browser.current_url
    second = int(browser.current_url.split("/review/")[1].split("?")[0])
    browser.find_element(By.TAG_NAME, "body").send_keys("n")
    _wait_text(browser, "status", "saved")
    with wb.db.sessions() as session:
        image_id = session.get(Inspection, second).image_id
        assert (
            session.scalars(select(Review.verdict).where(Review.image_id == image_id)).one()
            == "normal"
        )
    browser.find_element(By.TAG_NAME, "body").send_keys(Keys.ARROW_LEFT)
    time.sleep(0.5)
    assert f"/review/{first}?" in browser.current_url
    assert browser.find_element(By.ID, "v-defect").get_attribute("class").endswith("on")

    browser.get(base + "/dashboard")
    assert browser.find_element(By.ID, "n-reviewed").text == "2"
    _shot(browser, "dashboard")
    logs = [e for e in browser.get_log("browser") if e["level"] == "SEVERE"]
    assert not logs, logs
