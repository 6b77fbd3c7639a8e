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
  fcconv demo --output /tmp/demo.png --seed 3 --no-progress""",
)
@click.option("--output", "-o", type=OutputPath(what="the demo picture", suffixes=IMAGE_SUFFIXES),
              default=Path("fcconv-demo.png"), show_default=True,
              help="Where to write the picture (.png, .pdf, .svg or .jpg).")
@click.option("--seed", type=click.IntRange(min=0), default=0, show_default=True,
              help="Picks the held-out digits and their places on the canvas.")
@click.option("--progress/--no-progress", default=True, show_default=True,
              help="Show a progress bar while the sliding window runs.")
def command(output: Path, seed: int, progress: bool) -> None:
    """Watch a digit classifier become a detector, in a few seconds and without any download.

    First the textbook: Linear(4, 2) with torch.manual_seed(123) on [[1, 2, 3, 4]], and the two
    convolutions it equals (the kernel covers the input; a 1x1 kernel over channels), bit for bit.
    Then the packaged 12x12 digit classifier, convolutionalized, reads a 64x192 canvas of held-out
    digits in one pass: its dense map equals the sliding window up to rounding, costs a fraction of
    its time, and finds the digits. The picture shows the canvas, the winning class of every cell
    with its confidence, and the detections.
    """
    from fcconv.demo import run_demo

    run_demo(output, seed=seed, progress=progress, echo=click.echo)
