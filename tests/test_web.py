"""The static browser page (web/, built by ``make web``) in headless Chromium, served from 127.0.0.1.

Needs the onnx extra, onnxruntime-web in web/node_modules (``npm ci --prefix web``; ``make test`` runs it where
npm is installed), Debian's chromium + chromium-driver and selenium. Without them the test is skipped with a
message, unless LATENTDIFF_REQUIRE_BROWSER=1 (as in CI), which makes it fail.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
import urllib.request

import numpy as np
import pytest
import torch

from test_export import tiny_student_pipeline
from test_serve_browser import browser_or_skip, free_port

from latentdiff.export import ORT_FILES, build_page, export, ort_web_dist
from latentdiff.noise import seeded_normal


def ort_web_or_skip() -> None:
    missing = [f for f in ORT_FILES if not (ort_web_dist() / f).is_file()]
    if missing:
        message = f"onnxruntime-web is not installed ({missing[0]} missing): npm ci --prefix web (make web does)"
        if os.environ.get("LATENTDIFF_REQUIRE_BROWSER"):
            pytest.fail(message)
        pytest.skip(message)


@pytest.fixture(scope="module")
def page(tmp_path_factory):
    """(page URL, the student pipeline): the tiny student exported and built into a page, on a static server."""
    ort_web_or_skip()
    root = tmp_path_factory.mktemp("web")
    pipe = tiny_student_pipeline()
    pipe.save_pretrained(root / "student")
    export(root / "student", root / "site" / "model")
    build_page(root / "site" / "model", root / "site")
    port = free_port()
    server = subprocess.Popen([sys.executable, "-m", "http.server", "--bind", "127.0.0.1", str(port), "-d",
                               str(root / "site")], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}/"
    try:
        for _ in range(100):
            try:
                urllib.request.urlopen(url, timeout=1).close()
                break
            except OSError:
                time.sleep(0.1)
        yield url, pipe
    finally:
        server.terminate()
        server.wait(timeout=10)


@pytest.fixture(scope="module")
def browser():
    chromium, chromedriver = browser_or_skip()
    from selenium import webdriver

    opts = webdriver.ChromeOptions()
    opts.binary_location = chromium
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--window-size=1000,900"):
        opts.add_argument(arg)
    opts.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(options=opts, service=webdriver.ChromeService(executable_path=chromedriver))
    try:
        yield driver
    finally:
        driver.quit()


def wait_for_runs(d, n: int, timeout: float = 120) -> list[dict]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        error = d.execute_script("return document.getElementById('error').textContent")
        assert not error, f"the page failed: {error}"
        runs = d.execute_script("return window.latentdiff && window.latentdiff.runs") or []
        if len(runs) >= n:
            return runs
        time.sleep(0.05)
    raise AssertionError(f"the page made {n} grids in {timeout}s? it did not")


def test_page_draws_pythons_digits_from_its_own_host(browser, page):
    url, pipe = page
    d = browser
    d.get(url + "?class=3&n=16&seed=42&scale=2.5")
    runs = wait_for_runs(d, 1)
    assert runs[0]["count"] == 16 and runs[0]["label"] == 3 and runs[0]["seed"] == 42
    assert d.find_element("id", "status").text.startswith("16 digits in ")
    assert "after the page started loading" in d.find_element("id", "first").text

    # The grid's pixels: 8 digits a row, one canvas pixel per image pixel, against PyTorch's digits.
    pixels = d.execute_script("const c = document.getElementById('grid');"
                              "return Array.from(c.getContext('2d').getImageData(0, 0, c.width, c.height).data);")
    grid = np.array(pixels, dtype=np.int32).reshape(2 * 28, 8 * 28, 4)[..., 0]
    page_digits = grid.reshape(2, 28, 8, 28).transpose(0, 2, 1, 3).reshape(16, 28, 28)
    want = (pipe.generate([3] * 16, seed=42, guidance_scale=2.5)[:, 0] * 255).round().to(torch.int32).numpy()
    assert np.abs(page_digits - want).max() <= 2
    assert page_digits.std() > 5  # a real picture, not a blank canvas

    # The page's noise is noise.py's, bit for bit (seeds beyond 32 bits, negative ones, later streams).
    js_noise = d.execute_async_script(
        "const done = arguments[arguments.length - 1];"
        "import('./latentdiff.js').then(m => done(Array.from(m.seededNormal([0, 7, 2 ** 40 + 3, -5], 196, 2))));")
    seeds = torch.tensor([0, 7, 2**40 + 3, -5])
    assert np.array_equal(np.array(js_noise, dtype=np.float32), seeded_normal(seeds, (4, 7, 7), stream=2).flatten().numpy())

    # Another grid from the form; then: no request left the host, nothing in the console.
    d.find_element("id", "seed").clear()
    d.find_element("id", "seed").send_keys("7")
    d.find_element("id", "generate").click()
    assert wait_for_runs(d, 2)[1]["seed"] == 7
    origin = url.rstrip("/")
    requested = d.execute_script("return performance.getEntriesByType('resource').map(e => e.name)")
    assert requested and all(r.startswith(origin + "/") for r in requested), requested
    assert [e for e in d.get_log("browser") if e["level"] in ("SEVERE", "WARNING")] == []
