"""``fcconv demo``: the textbook's equivalences, then a digit classifier that becomes a detector."""

from __future__ import annotations

from pathlib import Path

import click

from fcconv._io import IMAGE_SUFFIXES
from fcconv.cli._app import OutputPath

__all__ = ["command"]


@click.command(
    "demo",
    epilog="""\b
Examples:
  fcconv demo
  fcconv demo --output /tmp/demo.png --seed 3 --no-progress
  fcconv demo --canvas canvas.png      (a test image for fcconv heatmap)""",
)
@click.option("--output", "-o", type=OutputPath(what="the demo picture", suffixes=IMAGE_SUFFIXES),
              default=Path("fcconv-demo.png"), show_default=True,
              help="Where to write the picture (.png, .pdf, .svg or .jpg).")
@click.option("--seed", type=click.IntRange(min=0), default=0, show_default=True,
              help="Picks the held-out digits and their places on the canvas.")
@click.option("--progress/--no-progress", default=True, show_default=True,
              help="Show a progress bar while the sliding window runs.")
@click.option("--canvas", type=OutputPath(what="the canvas", suffixes=(".png",)), metavar="FILE.png",
              help="Only write the test canvas (for --seed) to FILE.png, a picture fcconv heatmap reads "
                   "with the embedded model: white digits on black, 192x64 pixels.")
def command(output: Path, seed: int, progress: bool, canvas: Path | None) -> None:
    """Watch a digit classifier become a detector, in a few seconds and without any download.

    First the textbook: Linear(4, 2) with torch.manual_seed(123) on [[1, 2, 3, 4]], and the two
    convolutions it equals (the kernel covers the input; a 1x1 kernel over channels), bit for bit.
    Then the packaged 12x12 digit classifier, convolutionalized, reads a 64x192 canvas of held-out
    digits in one pass: its dense map equals the sliding window up to rounding, costs a fraction of
    its time, and finds the digits. The picture shows the canvas, the winning class of every cell
    with its confidence, and the detections.
    """
    if canvas is not None:
        _write_canvas(canvas, seed)
        return
    from fcconv.demo import run_demo

    run_demo(output, seed=seed, progress=progress, echo=click.echo)


def _write_canvas(path: Path, seed: int) -> None:
    from fcconv.demo import save_canvas

    digits = save_canvas(path, seed=seed)
    height, width = digits.image.shape[1:]
    click.echo(f"Wrote {path}: {width}x{height} pixels, white ink on black, {len(digits.labels)} held-out "
               f"digits ({' '.join(map(str, digits.labels))}). Map it with the embedded model:")
    click.echo(f"  fcconv heatmap fcconv.demo.digits:load_digits_model {path} --input 1,12,12 "
               "--labels fcconv.demo.digits:CLASS_NAMES --hide background -o digits-map.png")
