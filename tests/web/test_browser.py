"""The page in a real browser: Playwright driving Debian's Chromium, headless, off the network."""

import io
import socket
import threading
import time

import numpy as np
import pytest
from PIL import Image

from tests.web.chromium import CHROMIUM, FLAGS, NEEDS_CHROMIUM

playwright_api = pytest.importorskip("playwright.sync_api")
uvicorn = pytest.importorskip("uvicorn")

pytestmark = NEEDS_CHROMIUM


@pytest.fixture(scope="module")
def server():
    from cnnscope.web import create_app

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    config = uvicorn.Config(create_app(), host="127.0.0.1", port=port, log_level="warning")
    instance = uvicorn.Server(config)
    thread = threading.Thread(target=instance.run, daemon=True)
    thread.start()
    deadline = time.time() + 30
    while not instance.started and time.time() < deadline:
        time.sleep(0.05)
    yield f"http://127.0.0.1:{port}"
    instance.should_exit = True
    thread.join(timeout=10)


@pytest.fixture(scope="module")
def page(server):
    with playwright_api.sync_playwright() as driver:
        browser = driver.chromium.launch(executable_path=CHROMIUM, headless=True, args=FLAGS)
        context = browser.new_context(viewport={"width": 1280, "height": 900})
        page = context.new_page()
        page.goto(server)
        page.wait_for_selector("body[data-ready=true]", state="attached")
        yield page
        browser.close()


def test_sample_top5_any_class_method_slider_and_screenshot(page, tmp_path):
    page.select_option("#sample", "chelsea")
    page.wait_for_function("document.querySelectorAll('#top5 li').length === 5")
    assert "Egyptian cat" in page.inner_text("#top5 li:first-child")
    page.wait_for_function("document.querySelector('#caption').textContent.includes('Egyptian cat')")
    page.fill("#classSearch", "tench, Tinca tinca")
    page.click("#explainClass")
    page.wait_for_function("document.querySelector('#caption').textContent.includes('tench')")  # not in the top-5
    page.select_option("#method", "gradcam++")
    page.wait_for_function("document.querySelector('#caption').textContent.startsWith('gradcam++')")
    page.eval_on_selector("#opacity", "el => { el.value = '0.8'; el.dispatchEvent(new Event('input')); }")
    assert page.eval_on_selector("#heat", "el => el.style.opacity") == "0.8"
    shot = tmp_path / "page.png"
    page.locator("#stage").screenshot(path=str(shot))
    pixels = np.asarray(Image.open(shot).convert("RGB"), dtype=np.float32)
    assert pixels.shape[0] > 100 and pixels.std() > 20  # a photo with a heatmap, not a blank box


def test_upload_and_bad_file_messages(page, tmp_path):
    from cnnscope.samples import sample_image

    good = tmp_path / "coffee.png"
    Image.fromarray(sample_image("coffee")).save(good)
    page.set_input_files("#file", str(good))
    page.wait_for_function(
        "document.querySelector('#top5 li') && document.querySelector('#top5 li').textContent.includes('espresso')"
    )
    bad = tmp_path / "notes.png"
    bad.write_bytes(io.BytesIO(b"plain text, not an image").getvalue())
    page.set_input_files("#file", str(bad))
    page.wait_for_function("document.querySelector('#message').textContent.includes('not an image')")


def test_compare_methods_side_by_side(page):
    page.select_option("#sample", "coffee")
    page.wait_for_function("document.querySelector('#caption').textContent.includes('espresso')")
    page.click("#compare")
    page.wait_for_function("document.querySelectorAll('#panels figure').length === 3", timeout=60000)


def test_download_is_the_photo_with_the_overlay_at_the_chosen_opacity(page, tmp_path):
    from cnnscope.samples import sample_image

    photo = sample_image("chelsea").astype(np.float32)
    page.select_option("#sample", "chelsea")
    page.wait_for_function("document.querySelector('#caption').textContent.includes('Egyptian cat')")
    page.wait_for_function("!document.querySelector('#download').disabled")
    saved = {}
    for opacity in ("0", "0.8"):
        page.eval_on_selector("#opacity", f"el => {{ el.value = '{opacity}'; el.dispatchEvent(new Event('input')); }}")
        with page.expect_download() as info:
            page.click("#download")
        download = info.value
        assert download.suggested_filename.startswith("cnnscope-") and download.suggested_filename.endswith(".png")
        path = tmp_path / f"overlay-{opacity}.png"
        download.save_as(str(path))
        with Image.open(path) as picture:
            saved[opacity] = np.asarray(picture.convert("RGB"), dtype=np.float32)
    # at the photo's own size; at opacity 0 the photo itself, at 0.8 mostly the heatmap's colours
    assert saved["0"].shape == photo.shape == saved["0.8"].shape
    assert np.abs(saved["0"] - photo).mean() < 1.0
    assert np.abs(saved["0.8"] - photo).mean() > 20.0


def test_a_late_answer_for_the_previous_photo_is_dropped(page):
    held = []

    def hold_the_cat(route):
        body = route.request.post_data_buffer or b""
        if not held and b"chelsea" in body:
            held.append(route)  # answered only after the next photo's explanation is on screen
        else:
            route.continue_()

    page.route("**/api/explain", hold_the_cat)
    try:
        page.select_option("#sample", "chelsea")
        page.wait_for_function("document.querySelectorAll('#top5 li').length === 5")
        deadline = time.time() + 30
        while not held and time.time() < deadline:
            page.wait_for_timeout(50)
        assert held, "the explanation request for the first photo was not seen"
        page.select_option("#sample", "coffee")
        page.wait_for_function("document.querySelector('#caption').textContent.includes('espresso')")
        heat = page.get_attribute("#heat", "src")
        held[0].continue_()
        page.wait_for_timeout(1500)  # the cat's answer arrives now
        assert "espresso" in page.inner_text("#caption") and page.get_attribute("#heat", "src") == heat
    finally:
        page.unroute("**/api/explain", hold_the_cat)
