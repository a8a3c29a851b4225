"""The embedding scatter in a real browser (Playwright driving Debian's Chromium, headless, from disk)."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from cnnscope.render.scatter import ATLAS_TILES, ScatterData, scatter_html
from tests.web.chromium import CHROMIUM, FLAGS, NEEDS_CHROMIUM

playwright_api = pytest.importorskip("playwright.sync_api")

pytestmark = NEEDS_CHROMIUM
CLASSES = ["red", "green", "blue"]
COLOURS = [(220, 30, 30), (30, 200, 30), (30, 30, 220)]
PALETTE_RGB = [(0x1F, 0x77, 0xB4), (0xFF, 0x7F, 0x0E), (0x2C, 0xA0, 0x2C)]  # the scatter's first three colours


def _jpeg(colour) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (72, 72), colour).save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


def _data(count: int, thumbnails: int, seed: int = 0) -> ScatterData:
    """Three blobs of points, one per class; every 10th point misclassified; the first ``thumbnails`` points
    have a plain picture of their class's colour and a map that is hot in its top-left quarter."""
    rng = np.random.default_rng(seed)
    labels = np.arange(count) % 3
    centres = np.array([[0.0, 0.0], [10.0, 0.0], [5.0, 9.0]])
    points = centres[labels] + rng.normal(size=(count, 2))
    predicted = labels.copy()
    predicted[::10] = (labels[::10] + 1) % 3
    top3 = np.stack([predicted, (predicted + 1) % 3, (predicted + 2) % 3], axis=1)
    maps = np.zeros((thumbnails, 8, 8), np.float32)
    maps[:, :4, :4] = 1.0
    return ScatterData(
        points=points,
        labels=labels,
        predicted=predicted,
        class_names=CLASSES,
        names=[f"img{i}.png" for i in range(count)],
        top3=top3,
        top3_probability=np.tile([0.7, 0.2, 0.1], (count, 1)),
        cluster=(np.arange(count) % 2).astype(np.int32),
        thumbnail_rows=np.arange(thumbnails),
        thumbnails=[_jpeg(COLOURS[labels[i]]) for i in range(thumbnails)],
        maps=maps,
        title="test scatter",
    )


@pytest.fixture(scope="module")
def browser():
    with playwright_api.sync_playwright() as driver:
        launched = driver.chromium.launch(executable_path=CHROMIUM, headless=True, args=FLAGS)
        yield launched
        launched.close()


def _open(browser, path):
    page = browser.new_context(viewport={"width": 1000, "height": 760}).new_page()
    page.goto(path.as_uri())
    page.wait_for_selector("body[data-ready=true]", state="attached", timeout=60_000)
    return page


@pytest.mark.slow
def test_hover_shows_thumbnail_and_top3_click_opens_map(browser, tmp_path):
    path = tmp_path / "scatter.html"
    # more thumbnails than one atlas holds: two atlases, only the hovered one is loaded
    per_atlas = ATLAS_TILES * ATLAS_TILES
    data = _data(per_atlas + 60, per_atlas + 60)
    path.write_text(scatter_html(data), encoding="utf-8")
    page = _open(browser, path)
    assert page.eval_on_selector("#plot", "c => +c.dataset.drawn") == len(data.points)
    assert page.eval_on_selector("#plot", "c => +c.dataset.wrong") == int((data.labels != data.predicted).sum())
    assert page.evaluate("document.body.dataset.atlasesLoaded") is None  # nothing decoded before a hover

    point = 4  # class green, correct, on the first atlas
    x, y = page.evaluate(f"window.cnnscopeScatter.screen({point})")
    box = page.locator("#plot").bounding_box()
    page.mouse.move(box["x"] + x, box["y"] + y)
    page.wait_for_selector("#tip canvas.thumb", timeout=10_000)
    hovered = int(page.eval_on_selector("#tip", "t => t.dataset.point"))
    assert data.labels[hovered] == data.labels[point] or np.allclose(data.points[hovered], data.points[point], atol=1.0)
    tip_text = page.inner_text("#tip")
    assert f"img{hovered}.png" in tip_text and "70.0%" in tip_text
    assert page.eval_on_selector_all("#tip ol.top3 li", "items => items.length") == 3
    page.wait_for_selector("#tip canvas.thumb[data-loaded='1']", timeout=10_000)  # drawn once its atlas loaded
    pixel = page.evaluate(
        "(() => { const c = document.querySelector('#tip canvas.thumb');"
        " return Array.from(c.getContext('2d').getImageData(48, 48, 1, 1).data); })()"
    )
    expected = COLOURS[data.labels[hovered]]
    assert np.abs(np.array(pixel[:3]) - np.array(expected)).max() < 40  # the hovered image's own picture
    assert page.evaluate("document.body.dataset.atlasesLoaded") == "1"  # the second atlas stays a string

    page.mouse.click(box["x"] + x, box["y"] + y)
    page.wait_for_selector("#detail-image[data-loaded='1']", timeout=10_000)
    hot, cold = page.evaluate(
        "(() => { const c = document.querySelector('#detail-image').getContext('2d');"
        " return [Array.from(c.getImageData(40, 40, 1, 1).data), Array.from(c.getImageData(216, 216, 1, 1).data)]; })()"
    )
    # the map is hot in the top-left quarter: jet's red over the picture there, the plain picture elsewhere
    assert np.abs(np.array(cold[:3]) - np.array(expected)).max() < 40
    assert np.abs(np.array(hot[:3]) - np.array(cold[:3])).max() > 60
    assert "map of the predicted class" in page.inner_text("#detail")

    page.select_option("#colour", "correct")
    assert page.inner_text("#legend").split() == ["right", "wrong"]
    page.select_option("#colour", "cluster")
    assert "main strategy" in page.inner_text("#legend")


@pytest.mark.slow
def test_100k_points_draw_and_hover(browser, tmp_path):
    path = tmp_path / "big.html"
    data = _data(100_000, 500, seed=1)
    path.write_text(scatter_html(data), encoding="utf-8")
    page = _open(browser, path)
    assert page.eval_on_selector("#plot", "c => +c.dataset.drawn") == 100_000
    page.select_option("#colour", "predicted")  # a redraw of every point
    page.wait_for_function("+document.querySelector('#plot').dataset.draws >= 2")
    assert page.eval_on_selector("#plot", "c => +c.dataset.drawn") == 100_000
    x, y = page.evaluate("window.cnnscopeScatter.screen(70000)")
    box = page.locator("#plot").bounding_box()
    page.mouse.move(box["x"] + x, box["y"] + y)
    page.wait_for_selector("#tip[data-point]", timeout=10_000)
    hovered = int(page.eval_on_selector("#tip", "t => t.dataset.point"))
    assert np.linalg.norm(data.points[hovered] - data.points[70000]) < 0.5
    pixels = np.asarray(Image.open(io.BytesIO(page.locator("#plot").screenshot())).convert("RGB"), dtype=np.int32)
    # the points are on the canvas, not only counted: each class's colour covers a similar share of it
    shares = [(np.abs(pixels - np.array(rgb)).max(axis=-1) < 30).mean() for rgb in PALETTE_RGB]
    assert min(shares) > 0.002 and max(shares) < 3 * min(shares), shares
