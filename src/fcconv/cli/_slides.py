"""The whole-slide options of ``fcconv heatmap ... -o X.zarr`` (issue 17), in one decorator."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import click

__all__ = ["slide_options"]


def slide_options(command: Callable[..., Any]) -> Callable[..., Any]:
    """Add ``--mpp``, ``--magnification``, ``--mask``, ``--scores``, ``--prefetch``, ``--dtype`` and
    ``--class`` to a command."""
    options = [
        click.option("--mpp", type=click.FloatRange(min=0, min_open=True), metavar="UM",
                     help="With -o X.zarr and a slide: micrometres per pixel to read at (the coarsest "
                          "level at least as fine, area-averaged when none matches)."),
        click.option("--magnification", type=click.FloatRange(min=0, min_open=True), metavar="X",
                     help="With -o X.zarr and a slide: the objective power to read at, e.g. 20."),
        click.option("--mask", metavar="otsu|FILE",
                     help="With -o X.zarr: compute only cells whose window touches tissue: 'otsu' "
                          "(threshold on a thumbnail) or a mask image (nonzero is tissue)."),
        click.option("--scores", "score_kind", type=click.Choice(["logits", "probabilities"]),
                     default="logits", show_default=True,
                     help="With -o X.zarr: store logits or softmax probabilities."),
        click.option("--prefetch/--no-prefetch", default=True, show_default=True,
                     help="With -o X.zarr: read the next blocks while the model runs (local runs)."),
        click.option("--dtype", "model_dtype",
                     type=click.Choice(["float32", "float64", "float16", "bfloat16"]),
                     help="With -o X.zarr: run the model in this dtype (float16/bfloat16: on CUDA; "
                          "bfloat16 maps are stored as float32)."),
        click.option("--class", "show_class", metavar="NAME|INDEX",
                     help="With --preview: draw this class's probability instead of the winners."),
    ]
    for option in reversed(options):
        command = option(command)
    return command
