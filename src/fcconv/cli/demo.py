"""``fcconv demo``: the textbook's equivalences, then a digit classifier that becomes a detector."""

from __future__ import annotations

import re
from pathlib import Path

import click

from fcconv._io import IMAGE_SUFFIXES
from fcconv.cli._app import OutputPath

__all__ = ["command"]


def _height_width(ctx: click.Context, param: click.Parameter, value: str) -> tuple[int, int]:
    match = re.fullmatch(r"\s*(\d+)\s*[x,]\s*(\d+)\s*", value)
    if not match or min(int(match[1]), int(match[2])) < 12:
        raise click.BadParameter(
            f"expected HxW, two sizes of at least 12 pixels such as 2048x3072; got {value!r}."
        )
    return int(match[1]), int(match[2])


@click.command(
    "demo",
    epilog="""\b
Examples:
  fcconv demo
  fcconv demo --output /tmp/demo.png --seed 3 --no-progress
  fcconv demo --canvas canvas.png      (a test image for fcconv heatmap)
  fcconv demo --canvas big.tif --canvas-size 2048x3072   (a tiled TIFF for heatmap -o map.zarr)""",
)
@click.option("--output", "-o", type=OutputPath(what="the demo picture", suffixes=IMAGE_SUFFIXES),
              default=Path("fcconv-demo.png"), show_default=True,
              help="Where to write the picture (.png, .pdf, .svg or .jpg).")
@click.option("--seed", type=click.IntRange(min=0), default=0, show_default=True,
              help="Picks the held-out digits and their places on the canvas.")
@click.option("--progress/--no-progress", default=True, show_default=True,
              help="Show a progress bar while the sliding window runs.")
@click.option("--canvas", type=OutputPath(what="the canvas", suffixes=(".png", ".tif", ".tiff")),
              metavar="FILE",
              help="Only write the test canvas (for --seed) to FILE (.png, or a tiled .tif for big sizes), a "
                   "picture fcconv heatmap reads with the embedded model: white digits on black.")
@click.option("--canvas-size", callback=_height_width, default="64x192", show_default=True, metavar="HxW",
              help="With --canvas: its height and width in pixels, e.g. 2048x3072.")
def command(output: Path, seed: int, progress: bool, canvas: Path | None,
            canvas_size: tuple[int, int]) -> None:
    """Watch a digit classifier become a detector, in a few seconds and without any download.

    First the textbook: Linear(4, 2) with torch.manual_seed(123) on [[1, 2, 3, 4]], and the two
    convolutions it equals (the kernel covers the input; a 1x1 kernel over channels), bit for bit.
    Then the packaged 12x12 digit classifier, convolutionalized, reads a 64x192 canvas of held-out
    digits in one pass: its dense map equals the sliding window up to rounding, costs a fraction of
    its time, and finds the digits. The picture shows the canvas, the winning class of every cell
    with its confidence, and the detections.
    """
    if canvas is not None:
        _write_canvas(canvas, seed, canvas_size)
        return
    from fcconv.demo import run_demo

    run_demo(output, seed=seed, progress=progress, echo=click.echo)


def _write_canvas(path: Path, seed: int, size: tuple[int, int]) -> None:
    from fcconv.demo import save_canvas

    digits = save_canvas(path, seed=seed, size=size)
    height, width = digits.image.shape[1:]
    shown = " ".join(map(str, digits.labels[:30])) + (" ..." if len(digits.labels) > 30 else "")
    click.echo(f"Wrote {path}: {width}x{height} pixels, white ink on black, {len(digits.labels)} held-out "
               f"digits ({shown}). Map it with the embedded model:")
    tiled = "--tile 1024 -o digits-map.zarr --preview preview.png"
    out = "-o digits-map.png" if path.suffix.lower() == ".png" else tiled
    click.echo(f"  fcconv heatmap fcconv.demo.digits:load_digits_model {path} --input 1,12,12 "
               f"--labels fcconv.demo.digits:CLASS_NAMES --hide background {out}")
    if path.suffix.lower() != ".png":
        click.echo(f"and look at it, zoomed over the canvas, in a browser:\n"
                   f"  fcconv view digits-map.zarr --slide {path} --hide background")
