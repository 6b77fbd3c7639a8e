"""``fcconv heatmap --cam``: the exact class activation map drawn over an image."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from click.testing import CliRunner, Result

from fcconv.cli import app


def run(*args: str) -> Result:
    return CliRunner().invoke(app, list(args), prog_name="fcconv")


def _photo(path: Path, size: tuple[int, int] = (96, 80)) -> None:
    from PIL import Image

    generator = torch.Generator().manual_seed(0)
    pixels = (torch.rand(size[1], size[0], 3, generator=generator) * 255).to(torch.uint8).numpy()
    Image.fromarray(pixels, mode="RGB").save(path)


def test_heatmap_cam_draws_a_certified_map(tmp_path: Path) -> None:
    from PIL import Image

    pytest.importorskip("torchvision")
    image, out = tmp_path / "photo.png", tmp_path / "cam.png"
    _photo(image)
    result = run("heatmap", "torchvision:resnet18", str(image), "--input", "3,224,224", "--cam",
                 "--mean", "0.485,0.456,0.406", "--std", "0.229,0.224,0.225", "-o", str(out))
    assert result.exit_code == 0, result.output
    assert ("Image 96x80: a 3x3 class activation map whose mean is the model's output (certified in "
            "float64") in result.output
    assert "Top classes: " in result.output and f"Wrote {out}" in result.output
    with Image.open(out) as picture:
        assert picture.format == "PNG"
        colours = picture.convert("RGB").getcolors(maxcolors=1 << 20)
    assert colours is not None and len(colours) > 50


def test_heatmap_cam_refuses_a_head_that_is_not_affine(tmp_path: Path) -> None:
    pytest.importorskip("torchvision")
    image, out = tmp_path / "photo.png", tmp_path / "cam.png"
    _photo(image, (64, 64))
    result = run("heatmap", "torchvision:vgg11", str(image), "--input", "3,224,224", "--cam", "-o", str(out))
    assert result.exit_code == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(
        "Error: A class activation map is exact only for a head that is a global average pool"), lines
    assert "fcconv.convolutionalize gives a score map of windows" in lines[0]
    assert not out.exists()
