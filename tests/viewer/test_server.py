"""The viewer's server without a browser: tiles, the cell API, safety, the command line."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import tifffile
import zarr
from click.testing import CliRunner
from PIL import Image
from viewer_support import get, one_hot_map, serving, write_map

from fcconv.cli import app as cli_app
from fcconv.errors import FcconvError
from fcconv.viewer import ViewerApp, open_map, open_slide, server
from fcconv.viewer.tiles import class_colours, ramp

WINNERS = [[0, 1, 2, 0, 1, 2], [2, 2, 1, 1, 0, 0], [1, 0, 2, 1, 0, 2], [0, 0, 0, 2, 2, 2]]
# stride 8, window 16, offset 0: cell (r, c)'s box is [4 + 8r, 12 + 8r) x [4 + 8c, 12 + 8c) image pixels.
GEOMETRY = {"stride": (8, 8), "window": (16, 16), "image_shape": (1, 40, 56)}


@pytest.fixture
def small_map(tmp_path: Path) -> Path:
    scores = one_hot_map(WINNERS, 3)
    return write_map(tmp_path / "map.zarr", scores, classes=("cat", "dog", "bird"), **GEOMETRY)


def png(body: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(body)).convert("RGBA"))


def tile(viewer: ViewerApp, path: str) -> np.ndarray:
    response = viewer.handle(path)
    assert response.status == 200 and response.content_type == "image/png", response.body[:200]
    return png(response.body)


def test_argmax_tile_colours_each_stride_box_by_its_winner(small_map: Path) -> None:
    viewer = ViewerApp(open_map(small_map))
    assert viewer.pyramid.max_level == 6  # 56 pixels wide: 2**6 >= 56
    pixels = tile(viewer, "/tiles/map/argmax/6/0_0.png")
    assert pixels.shape == (40, 56, 4)
    colours = class_colours(3)
    for r, row in enumerate(WINNERS):
        for c, winner in enumerate(row):
            box = pixels[4 + 8 * r:12 + 8 * r, 4 + 8 * c:12 + 8 * c]
            assert (box[..., :3] == colours[winner]).all() and (box[..., 3] == 255).all(), (r, c)
    assert (pixels[:4, :, 3] == 0).all() and (pixels[:, :4, 3] == 0).all()  # outside every box
    assert (pixels[36:, :, 3] == 0).all() and (pixels[:, 52:, 3] == 0).all()


def test_hidden_classes_and_coarse_levels(small_map: Path) -> None:
    viewer = ViewerApp(open_map(small_map))
    hidden = tile(viewer, "/tiles/map/argmax/6/0_0.png?hide=1")
    assert hidden[4 + 4, 4 + 8 + 4, 3] == 0 and hidden[4 + 4, 4 + 4, 3] == 255  # cell (0, 1) is a dog
    half = tile(viewer, "/tiles/map/argmax/5/0_0.png")
    assert half.shape == (20, 28, 4)
    # half-size pixel (4, 4) has its centre at image (9, 9): cell (0, 0)
    assert (half[4, 4, :3] == class_colours(3)[WINNERS[0][0]]).all()
    assert viewer.handle("/tiles/map/argmax/7/0_0.png").status == 404  # past the finest level
    assert viewer.handle("/tiles/map/argmax/6/1_0.png").status == 404  # past the right edge
    assert viewer.handle("/tiles/map/argmax/6/0_0.png?hide=9").status == 400


def test_class_view_is_the_softmax_probability_on_the_ramp(small_map: Path) -> None:
    viewer = ViewerApp(open_map(small_map))
    pixels = tile(viewer, "/tiles/map/class-1/6/0_0.png")
    high = np.exp(4) / (np.exp(4) + 2)   # the cell's winner is class 1
    low = 1 / (np.exp(4) + 2)
    lut = ramp()
    assert (pixels[8, 4 + 8 + 4, :3] == lut[round(high * 255)]).all()  # cell (0, 1): dog
    assert (pixels[8, 8, :3] == lut[round(low * 255)]).all()            # cell (0, 0): cat
    assert viewer.handle("/tiles/map/class-3/6/0_0.png").status == 404


def test_many_classes_are_read_block_by_block_with_the_same_colours(tmp_path: Path) -> None:
    scores = np.random.default_rng(1).normal(scale=3, size=(40, 4, 6)).astype(np.float32)
    path = write_map(tmp_path / "m.zarr", scores, chunks=(16, 4, 6), **GEOMETRY)
    viewer = ViewerApp(open_map(path))
    assert [(b.start, b.stop) for b in viewer.view.class_blocks()] == [(0, 16), (16, 32), (32, 40)]
    argmax = tile(viewer, "/tiles/map/argmax/6/0_0.png")
    chosen = tile(viewer, "/tiles/map/class-37/6/0_0.png")
    e = np.exp(scores.astype(np.float64) - scores.max(0))
    probability = (e / e.sum(0))[37]
    for r in range(4):
        for c in range(6):
            centre = (8 + 8 * r, 8 + 8 * c)
            assert (argmax[centre][:3] == class_colours(40)[scores[:, r, c].argmax()]).all()
            assert (chosen[centre][:3] == ramp()[round(probability[r, c] * 255)]).all()


def test_cells_not_computed_are_transparent_and_their_tiles_not_cached(small_map: Path) -> None:
    scores = zarr.open_group(str(small_map), mode="r+")["0"]
    scores[:, 1, 2] = np.nan
    viewer = ViewerApp(open_map(small_map))
    before = tile(viewer, "/tiles/map/argmax/6/0_0.png")
    assert (before[12:20, 20:28, 3] == 0).all() and (before[4:12, 4:12, 3] == 255).all()
    scores[:, 1, 2] = [9, 0, 0]
    after = tile(viewer, "/tiles/map/argmax/6/0_0.png")
    assert (after[12:20, 20:28, :3] == class_colours(3)[0]).all() and (after[12:20, 20:28, 3] == 255).all()
    scores[:, 1, 2] = [0, 0, 9]  # a complete tile is cached: the server reads no chunk again
    assert (tile(viewer, "/tiles/map/argmax/6/0_0.png") == after).all()


def test_cells_a_mask_skipped_are_hatched_grey(tmp_path: Path) -> None:
    valid = np.ones((4, 6), dtype=np.uint8)
    valid[2, 3] = 0
    path = write_map(tmp_path / "m.zarr", one_hot_map(WINNERS, 3), valid=valid, **GEOMETRY)
    pixels = tile(ViewerApp(open_map(path)), "/tiles/map/argmax/6/0_0.png")
    box = pixels[20:28, 28:36]
    grey = (box[..., :3] == 96).all(-1) & (box[..., 3] == 200)
    assert grey.any() and (box[~grey][..., 3] == 0).all()  # stripes of grey and of nothing
    assert (pixels[12:20, 28:36, 3] == 255).all()


def test_cell_api_gives_the_top_classes_and_the_window(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    scores = rng.normal(size=(7, 4, 6)).astype(np.float32)
    path = write_map(tmp_path / "m.zarr", scores, stride=(8, 8), window=(16, 16), window_offset=(-2, 3),
                     image_shape=(3, 40, 56), downsample=2.0, mpp=(0.5, 0.5))
    viewer = ViewerApp(open_map(path))
    info = json.loads(viewer.handle("/api/info").body)
    assert (info["width"], info["height"], info["grid"], info["classes"][:2]) == (112, 80, [4, 6], ["0", "1"])
    assert info["complete"] is True and len(info["colours"]) == 7
    # cell (2, 3): box origin (-2 + 8 - 4, 3 + 8 - 4) = (2, 7) image px; its box centre in slide px:
    y, x = (2 + 8 * 2 + 4) * 2, (7 + 8 * 3 + 4) * 2
    answer = json.loads(viewer.handle(f"/api/cell?x={x}&y={y}").body)
    assert answer["cell"] == [2, 3]
    assert answer["window"] == {"x": (3 + 24) * 2, "y": (-2 + 16) * 2, "width": 32, "height": 32}
    order = np.argsort(-scores[:, 2, 3])[:5]
    assert [t["class"] for t in answer["top"]] == order.tolist()
    assert [t["score"] for t in answer["top"]] == [float(scores[k, 2, 3]) for k in order]
    e = np.exp(scores[:, 2, 3].astype(np.float64) - scores[:, 2, 3].max())
    assert answer["top"][0]["probability"] == pytest.approx(e.max() / e.sum(), rel=1e-12)
    assert json.loads(viewer.handle("/api/cell?x=0&y=0").body) == {"cell": None}
    assert viewer.handle("/api/cell?x=nan&y=1").status == 400
    assert viewer.handle("/api/cell?y=1").status == 400


@pytest.mark.parametrize("target", [
    "/tiles/../../etc/passwd", "/tiles/%2e%2e/%2e%2e/etc/passwd", "/tiles/slide/..%2f..%2fetc/passwd",
    "/static/../server.py", "/static/%2e%2e/server.py", "/static/..%2fserver.py", "//etc/passwd",
    "/etc/passwd", "/tiles/map/argmax/6/0_0.png/../../../../etc/passwd", "/static/app.js%00.png",
    "/tiles/map/argmax/6/..%2f0_0.png", "/static//etc/passwd", "/api/../static/app.js",
])
def test_urls_reach_no_file_but_the_named_ones(small_map: Path, target: str) -> None:
    viewer = ViewerApp(open_map(small_map))
    assert viewer.handle(target).status in (400, 404)
    with serving(viewer) as base:
        status, _, body = get(base + target)
    assert status in (400, 404) and b"root:" not in body


def test_the_server_answers_only_get_to_localhost(small_map: Path) -> None:
    with serving(ViewerApp(open_map(small_map))) as base:
        status, kind, body = get(base + "/")
        assert status == 200 and kind.startswith("text/html") and b"openseadragon.min.js" in body
        status, kind, body = get(base + "/static/openseadragon/openseadragon.min.js")
        assert status == 200 and body.startswith(b"//! openseadragon")
        assert get(base + "/static/openseadragon/LICENSE.txt")[0] == 200
        assert get(base + "/api/info", {"Host": "evil.example:80"})[0] == 403  # DNS rebinding
        request = __import__("urllib.request").request.Request(base + "/api/info", data=b"x", method="POST")
        with pytest.raises(Exception, match="405"):
            __import__("urllib.request").request.urlopen(request, timeout=10)


def test_slide_tiles_come_from_the_level_they_need(tmp_path: Path) -> None:
    pixels = (np.arange(80 * 112).reshape(80, 112) % 251).astype(np.uint8)
    with tifffile.TiffWriter(tmp_path / "s.tif") as tif:  # a pyramid: 80x112, then 40x56
        tif.write(pixels, tile=(32, 32), subifds=1)
        tif.write(np.full((40, 56), 7, np.uint8), tile=(32, 32), subfiletype=1)
    path = write_map(tmp_path / "m.zarr", one_hot_map(WINNERS, 3), stride=(8, 8), window=(16, 16),
                     image_shape=(1, 40, 56), level=1, downsample=2.0)
    viewer = ViewerApp(open_map(path), open_slide(tmp_path / "s.tif"))
    response = viewer.handle("/tiles/slide/7/0_0.jpg")
    assert response.status == 200 and response.content_type == "image/jpeg"
    shown = np.asarray(Image.open(io.BytesIO(response.body)))
    assert shown.shape == (80, 112) and np.abs(shown.astype(int) - pixels).mean() < 8  # JPEG
    coarse = np.asarray(Image.open(io.BytesIO(viewer.handle("/tiles/slide/6/0_0.jpg").body)))
    assert coarse.shape == (40, 56) and np.abs(coarse.astype(int) - 7).max() <= 2  # from level 1
    # the map over it: cell (r, c)'s box is [8 + 16r, 24 + 16r) slide pixels
    fine = tile(viewer, "/tiles/map/argmax/7/0_0.png")
    assert fine.shape == (80, 112, 4) and (fine[8:24, 24:40, :3] == class_colours(3)[WINNERS[0][1]]).all()


def test_a_slide_of_another_size_is_refused(tmp_path: Path, small_map: Path) -> None:
    tifffile.imwrite(tmp_path / "s.tif", np.zeros((50, 56), np.uint8))
    with pytest.raises(FcconvError, match="does not match the map: the map was computed on an image of 40x5"):
        ViewerApp(open_map(small_map), open_slide(tmp_path / "s.tif"))


def test_maps_without_the_geometry_are_refused(tmp_path: Path) -> None:
    old = zarr.open_array(str(tmp_path / "old.zarr"), mode="w", shape=(2, 3, 3), dtype="float32",
                          attributes={"fcconv_tiled_map": {}})
    assert old.shape == (2, 3, 3)
    with pytest.raises(FcconvError, match="was written by fcconv 0.2"):
        open_map(tmp_path / "old.zarr")
    with pytest.raises(FcconvError, match="is not a zarr store"):
        open_map(tmp_path)


def test_the_command_prints_the_url_the_ssh_way_and_warns_off_localhost(
        small_map: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def interrupted(self: object) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(server._Server, "serve_forever", interrupted)
    result = CliRunner().invoke(cli_app, ["view", str(small_map), "--port", "0", "--no-browser"])
    assert result.exit_code == 0, result.output
    assert "serving http://localhost:" in result.output and "ssh -L " in result.output
    assert "Warning" not in result.output
    result = CliRunner().invoke(cli_app, ["view", str(small_map), "--port", "0", "--no-browser",
                                          "--host", "0.0.0.0"])
    assert result.exit_code == 0 and "Warning: --host 0.0.0.0 lets every machine" in result.output
    result = CliRunner().invoke(cli_app, ["view", str(small_map), "--no-browser", "--hide", "dog,fish"])
    assert result.exit_code == 1
    assert "--hide 'fish' is not a class of the map; its classes are cat, dog, bird" in result.output
    result = CliRunner().invoke(cli_app, ["view", str(small_map.parent), "--no-browser"])
    assert result.exit_code == 1 and result.output.startswith("Error: ") and "zarr.json" in result.output


@pytest.mark.slow
def test_the_command_serves_until_stopped(small_map: Path) -> None:
    command = [sys.executable, "-m", "fcconv.cli", "view", str(small_map), "--port", "0", "--no-browser"]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               env={**os.environ, "PYTHONUNBUFFERED": "1"})
    try:
        assert process.stdout is not None
        line = process.stdout.readline()
        url = line.split("serving ", 1)[1].split()[0]
        status, _, body = get(url + "api/info")
        assert status == 200 and json.loads(body)["classes"] == ["cat", "dog", "bird"]
    finally:
        process.terminate()
        process.wait(timeout=30)


def test_the_command_help_shows_examples() -> None:
    result = CliRunner().invoke(cli_app, ["view", "--help"])
    assert result.exit_code == 0 and "Examples:" in result.output and "fcconv view " in result.output
    assert "ssh -L" in result.output


def test_a_map_of_probabilities_is_shown_as_it_is_not_through_softmax_again(tmp_path: Path) -> None:
    """fcconv heatmap --scores probabilities stores softmax already (attribute fcconv.scores)."""
    logits = np.random.default_rng(2).normal(scale=2, size=(3, 4, 6))
    e = np.exp(logits - logits.max(0))
    probabilities = (e / e.sum(0)).astype(np.float32)
    path = write_map(tmp_path / "p.zarr", probabilities, **GEOMETRY)
    group = zarr.open_group(str(path), mode="r+")
    group.attrs["fcconv"] = {**group.attrs["fcconv"], "scores": "probabilities"}
    viewer = ViewerApp(open_map(path))
    answer = json.loads(viewer.handle("/api/cell?x=30&y=20").body)  # cell (2, 3)
    assert answer["cell"] == [2, 3]
    assert [t["probability"] for t in answer["top"]] == pytest.approx(
        sorted(probabilities[:, 2, 3].astype(np.float64), reverse=True), rel=1e-12)
    chosen = tile(viewer, "/tiles/map/class-1/6/0_0.png")
    for r, c in [(0, 0), (2, 3), (3, 5)]:
        assert (chosen[8 + 8 * r, 8 + 8 * c, :3] == ramp()[round(float(probabilities[1, r, c]) * 255)]).all()


def test_a_map_read_between_levels_lies_on_the_slide(tmp_path: Path) -> None:
    """--mpp between levels: the map's image is level 1 area-resampled by 1.2 (downsample 2 x 1.2)."""
    with tifffile.TiffWriter(tmp_path / "s.tif") as tif:  # a pyramid: 80x112, then 40x56
        tif.write(np.zeros((80, 112), np.uint8), tile=(32, 32), subifds=1)
        tif.write(np.zeros((40, 56), np.uint8), tile=(32, 32), subfiletype=1)
    winners = [row[:4] for row in WINNERS[:3]]  # 33x46 image pixels (floor(40 / 1.2), floor(56 / 1.2))
    path = write_map(tmp_path / "m.zarr", one_hot_map(winners, 3), stride=(8, 8), window=(16, 16),
                     image_shape=(1, 33, 46), level=1, downsample=2.4)
    viewer = ViewerApp(open_map(path), open_slide(tmp_path / "s.tif"))
    fine = tile(viewer, "/tiles/map/argmax/7/0_0.png")
    # cell (r, c)'s box is [4 + 8r, 12 + 8r) image pixels, times 2.4 in slide pixels
    for r, c in [(0, 0), (1, 2), (2, 3)]:
        y, x = round((8 + 8 * r) * 2.4), round((8 + 8 * c) * 2.4)
        assert (fine[y, x, :3] == class_colours(3)[winners[r][c]]).all(), (r, c)
    wrong = write_map(tmp_path / "w.zarr", one_hot_map(winners, 3), stride=(8, 8), window=(16, 16),
                      image_shape=(1, 34, 46), level=1, downsample=2.4)
    with pytest.raises(FcconvError, match="does not match the map"):
        ViewerApp(open_map(wrong), open_slide(tmp_path / "s.tif"))
