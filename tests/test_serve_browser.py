"""The page in a real headless Chromium, against the real server (``python -m latentdiff.serve``) on loopback.

Needs Debian's chromium + chromium-driver and the selenium package (.ci/run installs them). Without them
the test is skipped with a message, unless LATENTDIFF_REQUIRE_BROWSER=1 (as in CI), which makes it fail.
LATENTDIFF_SERVE_MODEL=<ldm folder> serves a trained model instead of the tiny one, and
LATENTDIFF_SCREENSHOT=<png> keeps the screenshot (how docs/serve_page.png is made).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from conftest import REPO, tiny_pipeline

pytest.importorskip("starlette", reason="the serve extra is not installed: pip install -e '.[serve]'")


def browser_or_skip() -> tuple[str, str]:
    """(chromium binary, chromedriver), or skip (fail when LATENTDIFF_REQUIRE_BROWSER is set) naming what is missing."""
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    driver = shutil.which("chromedriver")
    try:
        import selenium  # noqa: F401
        has_selenium = True
    except ImportError:
        has_selenium = False
    missing = [name for name, ok in (("chromium", chromium), ("chromedriver", driver), ("selenium", has_selenium)) if not ok]
    if missing:
        message = (f"no headless browser ({', '.join(missing)} missing): apt-get install chromium chromium-driver and "
                   "pip install -e '.[test,serve]' (.ci/run does both)")
        if os.environ.get("LATENTDIFF_REQUIRE_BROWSER"):
            pytest.fail(message)
        pytest.skip(message)
    return chromium, driver


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_healthy(proc: subprocess.Popen, url: str, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"the server exited with {proc.returncode}:\n{proc.stdout.read()}")
        try:
            with urllib.request.urlopen(url + "/api/health", timeout=2) as r:
                if json.load(r)["status"] == "ok":
                    return
        except OSError:
            time.sleep(0.3)
    raise AssertionError(f"the server did not answer on {url} within {timeout}s")


@pytest.fixture
def server(tmp_path):
    """The real command on a free loopback port; always stopped at the end."""
    model = os.environ.get("LATENTDIFF_SERVE_MODEL")
    if not model:
        model = tmp_path / "ldm"
        tiny_pipeline().save_pretrained(model)
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    for _ in range(3):  # the port can be taken between free_port() and the bind; try another then
        port = free_port()
        proc = subprocess.Popen([sys.executable, "-m", "latentdiff.serve", "--model", str(model), "--port", str(port),
                                 "--device", "cpu"], cwd=REPO, env=env, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True)
        url = f"http://127.0.0.1:{port}"
        try:
            wait_healthy(proc, url)
            break
        except AssertionError as e:
            proc.kill()
            proc.wait()
            if "address already in use" not in str(e):
                raise
    try:
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@pytest.fixture
def browser():
    chromium, chromedriver = browser_or_skip()
    from selenium import webdriver

    opts = webdriver.ChromeOptions()
    opts.binary_location = chromium
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--window-size=1280,990",
                "--hide-scrollbars"):
        opts.add_argument(arg)
    driver = webdriver.Chrome(options=opts, service=webdriver.ChromeService(executable_path=chromedriver))
    try:
        yield driver
    finally:
        driver.quit()


def post(url: str, body: dict) -> dict:
    req = urllib.request.Request(url, json.dumps(body).encode(), {"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=120) as r:
        return json.load(r)


def test_page_generates_draws_edits_and_reproduces_from_its_url(browser, server, tmp_path):
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.actions import interaction
    from selenium.webdriver.common.actions.action_builder import ActionBuilder
    from selenium.webdriver.common.actions.pointer_input import PointerInput
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select, WebDriverWait

    d = browser
    wait = WebDriverWait(d, 120)
    js = d.execute_script
    loaded = "const i = document.getElementById(arguments[0]); return !!i && i.complete && i.naturalWidth > 0;"
    d.get(server)
    wait.until(lambda _: len(d.find_elements(By.CSS_SELECTOR, "#classes input")) == 10)
    assert "cpu" in d.find_element(By.ID, "model-info").text

    # Choose 1, 4, 7 with 5 each and seed 42, then generate.
    d.find_element(By.ID, "none").click()
    for c in (1, 4, 7):
        d.find_element(By.XPATH, f"//div[@id='classes']//span[text()='{c}']").click()
    for field, value in (("per-label", "5"), ("seed", "42")):
        d.find_element(By.ID, field).clear()
        d.find_element(By.ID, field).send_keys(value)
    d.find_element(By.ID, "generate").click()
    wait.until(lambda _: js(loaded, "grid"))
    assert re.match(r"15 digits in \d+\.\d\d s on the model .* seed 42$", d.find_element(By.ID, "gen-time").text)
    share = d.current_url
    assert "labels=1%2C4%2C7" in share and "per_label=5" in share and "seed=42" in share
    assert d.find_element(By.ID, "share-url").get_attribute("value") == share
    grid_src = d.find_element(By.ID, "grid").get_attribute("src")
    api = post(server + "/api/generate", {"labels": [1, 4, 7], "per_label": 5, "seed": 42})
    assert grid_src == api["image"] and d.find_element(By.ID, "download").get_attribute("href") == grid_src

    # Draw a "1" with the mouse on the 280x280 canvas (offsets from its centre).
    canvas = d.find_element(By.ID, "mask")  # the overlay takes the pointer events
    ActionChains(d).move_to_element_with_offset(canvas, 0, -90).click_and_hold().move_by_offset(5, 60) \
        .move_by_offset(5, 60).move_by_offset(0, 60).release().perform()
    lit = ("const c = document.getElementById(arguments[0]).getContext('2d').getImageData(0, 0, 280, 280).data;"
           "let n = 0; for (let i = arguments[1]; i < c.length; i += 4) if (c[i] > 128) n++; return n;")
    assert js(lit, "draw", 0) > 2000  # white pixels from the stroke (22 px wide, ~180 px long)
    d.find_element(By.ID, "count").clear()
    d.find_element(By.ID, "count").send_keys("4")

    # Paint the mask with a finger (touch pointer) over the bottom part, then fill it as a 7.
    d.find_element(By.XPATH, "//input[@value='mask']/..").click()
    actions = ActionBuilder(d, mouse=PointerInput(interaction.POINTER_TOUCH, "finger"))
    actions.pointer_action.move_to(canvas, -110, 40).pointer_down()
    for dx, dy in ((220, 0), (0, 20), (-220, 0), (0, 20), (220, 0), (0, 20), (-220, 0)):
        actions.pointer_action.move_by(dx, dy)
    actions.pointer_action.pointer_up()
    actions.perform()
    assert js(lit, "mask", 3) > 5000  # opaque mask pixels (alpha channel)
    Select(d.find_element(By.ID, "target")).select_by_visible_text("7")
    d.find_element(By.ID, "inpaint").click()
    wait.until(lambda _: js(loaded, "edit-output") and js(loaded, "edit-input"))
    assert re.match(r"filled as 7: 4 digits in \d+\.\d\d s", d.find_element(By.ID, "edit-time").text)
    assert d.find_element(By.ID, "edit-error").get_attribute("hidden")
    filled = d.find_element(By.ID, "edit-output").get_attribute("src")

    # Clear the mask, then redraw the whole drawing as a 7.
    d.find_element(By.ID, "clear-mask").click()
    assert js(lit, "mask", 3) == 0
    d.find_element(By.ID, "img2img").click()
    wait.until(lambda _: d.find_element(By.ID, "edit-output").get_attribute("src") != filled)
    wait.until(lambda _: js(loaded, "edit-output"))
    assert re.match(r"redrawn as 7: 4 digits in \d+\.\d\d s", d.find_element(By.ID, "edit-time").text)
    redrawn = d.find_element(By.ID, "edit-output").get_attribute("src")

    # The drawing in every class (DDIM inversion), told what was drawn.
    Select(d.find_element(By.ID, "drawn")).select_by_visible_text("1")
    d.find_element(By.ID, "every_class").click()
    wait.until(lambda _: d.find_element(By.ID, "edit-output").get_attribute("src") != redrawn)
    wait.until(lambda _: js(loaded, "edit-output"))
    assert re.match(r"your hand in every class: 10 digits in \d+\.\d\d s", d.find_element(By.ID, "edit-time").text)
    assert d.find_element(By.ID, "edit-error").get_attribute("hidden")

    shot = Path(os.environ.get("LATENTDIFF_SCREENSHOT") or tmp_path / "serve_page.png")
    shot.parent.mkdir(parents=True, exist_ok=True)
    js("window.scrollTo(0, 0)")
    assert d.save_screenshot(str(shot)) and shot.stat().st_size > 10_000

    # Opening the shared link in a fresh page shows the same grid again, without clicking anything.
    d.get("about:blank")
    d.get(share)
    wait.until(lambda _: js(loaded, "grid"))
    assert d.find_element(By.ID, "grid").get_attribute("src") == grid_src
    assert d.find_element(By.ID, "seed").get_attribute("value") == "42"


def test_page_teaches_a_new_symbol_from_drawings_and_generates_it(browser, server):
    """Draw three examples on the teach canvas, add them (and remove one, then add it again), teach a few steps, wait
    for done: the new class is in the picker, selected, and Generate draws it, as the API does."""
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    d = browser
    wait = WebDriverWait(d, 120)
    js = d.execute_script
    d.get(server)
    wait.until(lambda _: len(d.find_elements(By.CSS_SELECTOR, "#classes input")) == 10)
    canvas = d.find_element(By.ID, "teach-draw")
    js("arguments[0].scrollIntoView({block: 'center'})", canvas)
    thumbs = lambda: d.find_elements(By.CSS_SELECTOR, "#teach-examples img")  # noqa: E731
    lit = ("const c = document.getElementById('teach-draw').getContext('2d').getImageData(0, 0, 280, 280).data;"
           "let n = 0; for (let i = 0; i < c.length; i += 4) if (c[i] > 128) n++; return n;")
    d.find_element(By.ID, "teach-add").click()  # nothing drawn yet: refused on the page
    assert "draw the symbol" in d.find_element(By.ID, "teach-error").text and not thumbs()
    strokes = [(0, 180), (150, 120), (40, 170), (-40, 170)]  # bars at several slants, from the canvas's centre
    for i, ((dx, dy), count) in enumerate(zip(strokes, [1, 1, 2, 3])):
        ActionChains(d).move_to_element_with_offset(canvas, -dx // 2, -dy // 2).click_and_hold() \
            .move_by_offset(dx // 2, dy // 2).move_by_offset(dx - dx // 2, dy - dy // 2).release().perform()
        assert js(lit) > 1500  # white pixels from the stroke (22 px wide, 170 px or more long)
        d.find_element(By.ID, "teach-add").click()
        if i == 1:  # remove the second example again (click its thumbnail)
            assert len(thumbs()) == 2
            thumbs()[1].click()
        assert js(lit) == 0 and len(thumbs()) == count
    assert len(thumbs()) == 3 and d.find_element(By.ID, "teach-count").text.startswith("3 examples")

    d.find_element(By.ID, "teach-name").send_keys("bar")
    d.find_element(By.ID, "teach-steps").clear()
    d.find_element(By.ID, "teach-steps").send_keys("3")
    d.find_element(By.ID, "teach").click()
    wait.until(lambda _: d.find_element(By.ID, "teach-status").text.startswith('taught "bar" as class 10 from 3 examples'))
    assert d.find_element(By.ID, "teach-error").get_attribute("hidden") and not thumbs()
    boxes = d.find_elements(By.CSS_SELECTOR, "#classes input")
    assert len(boxes) == 11 and [b.is_selected() for b in boxes] == [False] * 10 + [True]
    assert d.find_element(By.XPATH, "//div[@id='classes']//span[text()='bar']").is_displayed()

    for field, value in (("per-label", "3"), ("seed", "7")):
        d.find_element(By.ID, field).clear()
        d.find_element(By.ID, field).send_keys(value)
    d.find_element(By.ID, "generate").click()
    loaded = "const i = document.getElementById('grid'); return !!i && i.complete && i.naturalWidth > 0;"
    wait.until(lambda _: js(loaded))
    assert re.match(r"3 digits in \d+\.\d\d s on the model .* seed 7$", d.find_element(By.ID, "gen-time").text)
    api = post(server + "/api/generate", {"labels": ["bar"], "per_label": 3, "seed": 7})
    assert d.find_element(By.ID, "grid").get_attribute("src") == api["image"] and api["settings"]["labels"] == [10]
