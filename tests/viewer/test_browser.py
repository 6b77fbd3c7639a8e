"""The page in a real browser: headless Chromium (Debian's package) driven by playwright.

Checks the overlay's pixel colours at known cells against the map, the hover readout and the drawn
window against the zarr, and saves the screenshot docs/viewer.md shows (docs/viewer.png). Skips
where playwright or Chromium is absent (CI installs Chromium in .ci/run).
"""

from __future__ import annotations

import io
import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image
from viewer_support import digits_map, serving, write_map

from fcconv.viewer import ViewerApp, open_map, open_slide
from fcconv.viewer.tiles import class_colours, ramp

sync_api = pytest.importorskip("playwright.sync_api", reason="the browser tests need playwright")
CHROMIUM = os.environ.get("FCCONV_CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")
pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="the browser tests need Chromium (apt-get install "
                                                         "chromium)")
ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
        "--disable-sync", "--no-first-run"]
SCREENSHOT = Path(__file__).resolve().parents[2] / "docs" / "viewer.png"
# stride 16, window 32: cell (r, c)'s box is [8 + 16r, 24 + 16r) x [8 + 16c, 24 + 16c) image pixels.
GEOMETRY = {"stride": (16, 16), "window": (32, 32), "image_shape": (1, 112, 144)}


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    with sync_api.sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        yield chromium
        chromium.close()


@pytest.fixture
def scores() -> np.ndarray:
    return np.random.default_rng(0).normal(size=(5, 6, 8)).astype(np.float32)


def open_page(browser: Any, base: str, items: int) -> Any:
    page = browser.new_page(viewport={"width": 1000, "height": 700})
    errors: list[str] = []
    page.on("pageerror", lambda error: errors.append(str(error)))
    page.goto(base + "/")
    wait_drawn(page, items)
    assert not errors, errors
    return page


def wait_drawn(page: Any, items: int) -> None:
    page.wait_for_function(f"window.fcconvViewer && fcconvViewer.viewer.world.getItemCount() === {items} "
                           "&& fcconvViewer.ready()", timeout=30_000)
    page.wait_for_timeout(300)  # the last frame painted


def on_screen(page: Any, y: float, x: float) -> tuple[float, float]:
    """Page coordinates of the image point (y, x), as OpenSeadragon places it."""
    return tuple(page.evaluate(
        """([y, x]) => { const v = fcconvViewer.viewer, item = v.world.getItemAt(0);
             const p = item.imageToViewerElementCoordinates(new OpenSeadragon.Point(x, y));
             const box = v.element.getBoundingClientRect(); return [p.y + box.top, p.x + box.left]; }""",
        [y, x]))


def set_opacity(page: Any, value: float) -> None:
    page.evaluate("v => { const s = document.getElementById('opacity'); s.value = v; "
                  "s.dispatchEvent(new Event('input')); }", value)
    page.wait_for_timeout(300)


def screenshot(page: Any) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(page.screenshot())).convert("RGB")).astype(int)


def test_the_overlay_shows_each_cells_class_where_the_cell_is(browser: Any, scores: np.ndarray,
                                                               tmp_path: Path) -> None:
    path = write_map(tmp_path / "m.zarr", scores, **GEOMETRY)
    winners, colours = scores.argmax(0), class_colours(5)
    with serving(ViewerApp(open_map(path))) as base:
        page = open_page(browser, base, items=1)
        set_opacity(page, 1.0)
        shot = screenshot(page)
        for r in range(6):
            for c in range(8):
                y, x = on_screen(page, 16 + 16 * r, 16 + 16 * c)
                assert np.abs(shot[round(y), round(x)] - colours[winners[r, c]]).max() <= 3, (r, c)
        y, x = on_screen(page, 4, 4)  # outside every stride box: the page's grey background
        assert np.abs(shot[round(y), round(x)] - 0x77).max() <= 3
        page.select_option("#view", "class-2")
        wait_drawn(page, items=1)
        shot = screenshot(page)
        e = np.exp(scores.astype(np.float64) - scores.max(0))
        probability = (e / e.sum(0))[2]
        for r, c in [(0, 0), (3, 5), (5, 7)]:
            y, x = on_screen(page, 16 + 16 * r, 16 + 16 * c)
            expected = ramp()[round(probability[r, c] * 255)]
            assert np.abs(shot[round(y), round(x)] - expected).max() <= 3, (r, c)
        page.close()


def test_hovering_a_cell_reads_it_from_the_map_and_draws_its_window(browser: Any, scores: np.ndarray,
                                                                     tmp_path: Path) -> None:
    names = ["ant", "bee", "cat", "dog", "eel"]
    path = write_map(tmp_path / "m.zarr", scores, classes=names, window_offset=(-4, 2), **GEOMETRY)
    with serving(ViewerApp(open_map(path))) as base:
        page = open_page(browser, base, items=1)
        for r, c in [(2, 3), (5, 0)]:
            # the box of cell (r, c) starts at offset + window/2 - stride/2 + stride * (r, c)
            y, x = on_screen(page, -4 + 8 + 16 * r + 8, 2 + 8 + 16 * c + 8)
            page.mouse.move(x, y)
            page.wait_for_selector(f"#cell-index[data-row='{r}'][data-col='{c}']", timeout=10_000)
            rows = page.query_selector_all("#readout tr.top")
            order = np.argsort(-scores[:, r, c], kind="stable")[:5]
            assert [int(row.get_attribute("data-class")) for row in rows] == order.tolist()
            assert [float(row.get_attribute("data-score")) for row in rows] == [float(scores[k, r, c])
                                                                              for k in order]
            assert [row.query_selector("td.name").inner_text() for row in rows] == [names[k] for k in order]
            top, left = on_screen(page, -4 + 16 * r, 2 + 16 * c)
            bottom, right = on_screen(page, -4 + 16 * r + 32, 2 + 16 * c + 32)
            page.wait_for_timeout(200)
            box = page.query_selector("#window").bounding_box()
            assert box is not None
            drawn = (box["y"], box["x"], box["y"] + box["height"], box["x"] + box["width"])
            assert np.abs(np.subtract(drawn, (top, left, bottom, right))).max() <= 2, (drawn, (r, c))
        page.close()


@pytest.mark.slow
def test_the_digits_show_their_classes_over_the_canvas(browser: Any, tmp_path: Path) -> None:
    slide, path = digits_map(tmp_path, 256, 384)
    view = open_map(path)
    hidden = view.classes.index("background")
    with serving(ViewerApp(view, open_slide(slide), hidden=[hidden])) as base:
        page = open_page(browser, base, items=2)
        scores = np.asarray(view.scores[...])
        winners = scores.argmax(0)
        digits = np.argwhere(winners != hidden)
        assert len(digits) > 100
        # a digit cell whose 3x3 neighbours win the same class: its colour over a canvas pixel
        r, c = next((int(r), int(c)) for r, c in digits if r > 40 and c > 40
                    and (winners[r - 1:r + 2, c - 1:c + 2] == winners[r, c]).all())
        set_opacity(page, 1.0)
        shot = screenshot(page)
        y, x = on_screen(page, 5 + 2 * r + 1, 5 + 2 * c + 1)  # box origin 0 + 6 - 1 = 5, stride 2
        assert np.abs(shot[round(y), round(x)] - class_colours(11)[winners[r, c]]).max() <= 3
        set_opacity(page, 0.5)
        page.evaluate("""([y, x]) => { const v = fcconvViewer.viewer;
            const p = v.world.getItemAt(0).imageToViewportCoordinates(x, y);
            v.viewport.zoomBy(2.5, p, true); v.viewport.panTo(p, true); }""", [5 + 2 * r + 1, 5 + 2 * c + 1])
        wait_drawn(page, items=2)
        y, x = on_screen(page, 5 + 2 * r + 1, 5 + 2 * c + 1)
        page.mouse.move(x, y)
        page.wait_for_selector(f"#cell-index[data-row='{r}'][data-col='{c}']", timeout=10_000)
        page.wait_for_timeout(300)
        SCREENSHOT.parent.mkdir(exist_ok=True)
        page.screenshot(path=str(SCREENSHOT))
        page.close()


def test_a_map_being_written_shows_its_cells_as_they_come(browser: Any, scores: np.ndarray,
                                                          tmp_path: Path) -> None:
    import zarr

    written = scores.copy()
    written[:, 3:] = np.nan  # the lower half is not computed yet
    path = write_map(tmp_path / "m.zarr", written, complete=False, **GEOMETRY)
    colours = class_colours(5)[scores.argmax(0)]
    with serving(ViewerApp(open_map(path), refresh=0.5)) as base:
        page = open_page(browser, base, items=1)
        set_opacity(page, 1.0)
        assert "being written" in page.inner_text("#status")
        top, bottom = on_screen(page, 16, 16), on_screen(page, 16 + 16 * 4, 16)
        shot = screenshot(page)
        assert np.abs(shot[round(top[0]), round(top[1])] - colours[0, 0]).max() <= 3
        assert np.abs(shot[round(bottom[0]), round(bottom[1])] - 0x77).max() <= 3  # transparent
        group = zarr.open_group(str(path), mode="r+")
        group["0"][:, 3:] = scores[:, 3:]
        group.attrs["fcconv"] = {**group.attrs["fcconv"], "complete": True}
        page.wait_for_function("document.getElementById('status').textContent === 'Map complete.'",
                               timeout=10_000)
        page.wait_for_timeout(1500)
        wait_drawn(page, items=1)
        shot = screenshot(page)
        assert np.abs(shot[round(bottom[0]), round(bottom[1])] - colours[4, 0]).max() <= 3
        page.close()


@pytest.mark.slow
def test_the_real_heatmap_store_shows_its_digits_in_the_browser(browser: Any, tmp_path: Path,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    """Issue 18's walk-through on a small canvas: fcconv demo --canvas, heatmap -o, then the page."""
    import zarr
    from click.testing import CliRunner

    from fcconv.cli import app

    monkeypatch.chdir(tmp_path)
    demo = CliRunner().invoke(app, ["demo", "--canvas", "small.tif", "--canvas-size", "256x384"],
                              prog_name="fcconv")
    assert demo.exit_code == 0, demo.output
    # the commands the demo prints, run as a new user would copy them
    heatmap, view_line = (line.split() for line in demo.output.splitlines()
                          if line.startswith(("  fcconv heatmap ", "  fcconv view ")))
    assert view_line == ["fcconv", "view", "digits-map.zarr", "--slide", "small.tif", "--hide", "background"]
    result = CliRunner().invoke(app, heatmap[1:], prog_name="fcconv")
    assert result.exit_code == 0, result.output
    group = zarr.open_group("digits-map.zarr", mode="r")
    assert "1" in group and "2" in group and "multiscales" in dict(group.attrs)["ome"]  # the OME pyramid
    view = open_map(tmp_path / "digits-map.zarr")
    assert view.classes[-1] == "background" and view.classes[:10] == [str(d) for d in range(10)]
    hidden = view.classes.index("background")
    scores = np.asarray(view.scores[...])
    winners = scores.argmax(0)
    stride, (top, left) = view.geometry.stride, view.geometry.window_offset[:2]
    window = view.geometry.window
    with serving(ViewerApp(view, open_slide(tmp_path / "small.tif"), hidden=[hidden])) as base:
        page = open_page(browser, base, items=2)
        set_opacity(page, 1.0)
        shot = screenshot(page)
        digits = [(int(r), int(c)) for r, c in np.argwhere(winners != hidden) if 0 < r < winners.shape[0] - 1
                  and 0 < c < winners.shape[1] - 1
                  and (winners[r - 1:r + 2, c - 1:c + 2] == winners[r, c]).all()]
        assert len(digits) >= 3
        colours = class_colours(len(view.classes))
        for r, c in digits[:: max(1, len(digits) // 5)]:
            # the centre of cell (r, c)'s stride box: the centre of its window
            y, x = on_screen(page, top + window[0] / 2 + stride[0] * r, left + window[1] / 2 + stride[1] * c)
            assert np.abs(shot[round(y), round(x)] - colours[winners[r, c]]).max() <= 3, (r, c)
        page.close()
