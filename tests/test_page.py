"""The web page at GET / in a real headless Chromium (Debian's `chromium`, driven by Playwright; no browser is
downloaded): type a prompt, generate, see the image with its seed, watch progress and a preview, interrupt, and
read a PNG's parameters by dropping it on the page.

SDGEN_SCREENSHOT=docs/serve-page.png also saves the screenshot the README shows.
"""

import base64
import io
import os
import shutil

import numpy as np
import pytest
from PIL import Image

from sdgen.serve import Background, Limits, Settings, create_app

PROMPT = "a yellow triangle at the top on a purple background"
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"


@pytest.fixture(scope="module")
def server():
    app = create_app(Settings(model="demo", device="cpu", precision="fp32", limits=Limits(max_steps=1000)))
    with Background(app) as url:
        yield app, url


@pytest.fixture(scope="module")
def page(server):
    if not os.path.exists(CHROMIUM):
        pytest.fail("the page test needs Debian's chromium: apt-get install -y chromium (.ci/run installs it)")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox", "--disable-gpu"])
        page = browser.new_page(viewport={"width": 1100, "height": 760})
        page.set_default_timeout(60_000)
        errors = []
        page.on("pageerror", lambda e: errors.append(str(e)))
        page.goto(server[1] + "/")
        page.wait_for_function("document.getElementById('sampler').options.length > 0")
        yield page
        assert not errors, errors
        browser.close()


def data_url_pixels(url: str) -> tuple[np.ndarray, Image.Image]:
    image = Image.open(io.BytesIO(base64.b64decode(url.split(",", 1)[1])))
    return np.asarray(image.convert("RGB")), image


def test_generate_shows_the_image_and_its_seed(server, page):
    app, _ = server
    assert page.inner_text("header small") == "demo"
    page.fill("#prompt", PROMPT)
    page.fill("#negative", "green")
    page.select_option("#sampler", "Euler a")
    page.fill("#steps", "12")
    page.fill("#seed", "42")
    page.fill("#batch", "2")
    page.click("#generate")
    page.wait_for_selector("#gallery figure:nth-child(2) img")
    assert "Done: seed 42" in page.inner_text("#status")
    figures = page.query_selector_all("#gallery figure")
    assert [f.get_attribute("data-seed") for f in figures] == ["43", "42"]   # newest first
    caption = figures[1].inner_text()
    assert PROMPT in caption and "Seed: 42" in caption and "Sampler: Euler a" in caption
    link = figures[1].query_selector("a")
    assert link.get_attribute("download") == "sdgen-42.png" and link.get_attribute("href").startswith("data:image/png")
    shown, png = data_url_pixels(figures[1].query_selector("img").get_attribute("src"))
    want = app.state.worker.pipe.generate(PROMPT, "green", steps=12, sampler="euler_a", seed=42, batch_size=2)
    np.testing.assert_array_equal(shown, np.asarray(want.images[0]))
    assert png.text["parameters"] == caption.split("\nDownload")[0].strip()


def test_progress_preview_and_interrupt(page, tmp_path):
    page.fill("#steps", "1000")
    page.fill("#batch", "1")
    page.fill("#seed", "7")
    page.click("#generate")
    page.wait_for_selector("#preview:not([hidden])")
    page.wait_for_function("document.getElementById('bar').value > 0")
    assert "Sampling step" in page.inner_text("#status")
    assert page.is_enabled("#interrupt") and page.is_disabled("#generate")
    shot = page.screenshot(full_page=True)
    (tmp_path / "serve-page.png").write_bytes(shot)
    if os.environ.get("SDGEN_SCREENSHOT"):
        with open(os.environ["SDGEN_SCREENSHOT"], "wb") as f:
            f.write(shot)
    page.click("#interrupt")
    page.wait_for_function("document.getElementById('status').textContent.includes('interrupted')")
    assert page.query_selector("#gallery figure").get_attribute("data-seed") == "7"
    assert page.is_enabled("#generate") and page.is_disabled("#interrupt")


def test_dropping_a_png_reads_its_parameters(page):
    src = page.query_selector("#gallery figure:last-child img").get_attribute("src")   # the seed-42 image
    page.fill("#prompt", "")
    page.evaluate("""async (url) => {
        const blob = await (await fetch(url)).blob();
        const dt = new DataTransfer();
        dt.items.add(new File([blob], "dropped.png", {type: "image/png"}));
        document.body.dispatchEvent(new DragEvent("drop", {dataTransfer: dt, bubbles: true, cancelable: true}));
    }""", src)
    page.wait_for_function("document.getElementById('pnginfo').textContent.includes('Seed: 42')")
    assert page.input_value("#prompt") == PROMPT and page.input_value("#seed") == "42"
    assert page.input_value("#negative") == "green" and page.input_value("#steps") == "12"
    page.evaluate("""() => {
        const dt = new DataTransfer();
        dt.items.add(new File([new Uint8Array([1, 2, 3])], "junk.png", {type: "image/png"}));
        document.body.dispatchEvent(new DragEvent("drop", {dataTransfer: dt, bubbles: true, cancelable: true}));
    }""")
    page.wait_for_selector("#pnginfo.error")
    assert "image:" in page.inner_text("#pnginfo")
