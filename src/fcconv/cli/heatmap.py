"""``fcconv heatmap MODEL IMAGE -o OUT.png``: a classifier's dense class map over an image.

The model is convolutionalized at its training size ``--input`` and run once over the whole image:
each cell of the map is the classification of one window of the image (``window`` pixels, ``stride``
apart). The picture shows the image, the winning class of every cell as a colour whose opacity is the
cell's confidence, one window outlined for scale, and the geometry in the title.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import click
import torch
from torch import Tensor, nn

from fcconv._io import IMAGE_SUFFIXES, atomic_output, image_format
from fcconv._shapes import format_shape
from fcconv.cli._app import InputShape, NumberList, OutputPath, fail, step
from fcconv.cli._loading import as_fcn_source, import_attribute, load_model
from fcconv.cli._slides import slide_options
from fcconv.cli.tiles import MapOutput, is_map_output
from fcconv.errors import FcconvError
from fcconv.models.modules import HEAD_IMPLS

__all__ = ["command", "load_image"]



def load_image(path: Path, channels: int, *, scale: float = 1.0) -> Tensor:
    """Read an image with Pillow as a float tensor ``(C, H, W)`` in ``[0, 1]``.

    Args:
        path: the image file.
        channels: 1 (read as grayscale) or 3 (read as RGB), the model's input channels.
        scale: resize factor applied first (bilinear).

    Raises:
        FcconvError: on an unreadable file or a channel count other than 1 or 3.
    """
    from PIL import Image, UnidentifiedImageError

    _refuse_tiff_stack(path)
    if channels not in (1, 3):
        raise FcconvError(
            f"heatmap reads images as grayscale (1 channel) or RGB (3 channels); the model's --input "
            f"has {channels} channels."
        )
    try:
        with Image.open(path) as image:
            picture = image.convert("L" if channels == 1 else "RGB")
    except UnidentifiedImageError:
        raise FcconvError(
            f"Cannot read {str(path)!r} as an image: Pillow does not recognise its format."
        ) from None
    except OSError as error:
        raise FcconvError(f"Cannot read the image {str(path)!r}: {error.strerror or error}.") from None
    if scale != 1.0:
        size = (max(1, round(picture.width * scale)), max(1, round(picture.height * scale)))
        picture = picture.resize(size, Image.Resampling.BILINEAR)
    data = torch.frombuffer(bytearray(picture.tobytes()), dtype=torch.uint8)
    return data.view(picture.height, picture.width, channels).permute(2, 0, 1).float() / 255.0


# Options that do nothing on one path, and what to use there instead.
_PICTURE_ONLY = {
    "scale": "with -o X.zarr the image is mapped at its own size: pick a pyramid level with --level, or "
             "resample the image first",
    "alpha": "-o X.zarr stores scores, not a picture: the --preview picture has a fixed opacity",
    "top": "-o X.zarr prints no class summary: read the classes from the map",
    "cam": "-o X.zarr writes the map of windows; --cam draws a picture: drop one",
}
_TILES_ONLY = {
    "tile": "a picture is computed in one pass over the whole image",
    "method": "a picture is computed in one pass over the whole image",
    "force": "a picture is computed in one pass over the whole image",
    "preview": "the picture -o writes is the preview",
    "level": "Pillow reads the first image of the file: give -o X.zarr to read a pyramid level",
    "workers": "a picture is computed in this process: give -o X.zarr to run tiles on a dask cluster",
    "scheduler": "a picture is computed in this process: give -o X.zarr to run tiles on a dask cluster",
    "overwrite": "a picture is always replaced",
    "wait": "a picture is written by this process alone: --wait waits for another run writing a map",
    "mpp": "a picture is read at its own size: give -o X.zarr to read a slide at a resolution",
    "magnification": "a picture is read at its own size: give -o X.zarr to read a slide at a resolution",
    "mask": "a picture computes every cell: give -o X.zarr to skip background",
    "score_kind": "a picture shows the winning class and its probability",
    "prefetch": "a picture is read in one piece",
    "model_dtype": "a picture runs the model in its own dtype",
    "show_class": "--class draws the --preview of -o X.zarr",
    "layout": "Pillow reads pictures as they are stored",
    "plane": "Pillow reads the first image of the file: give -o X.zarr to map a plane of a TIFF stack",
}


def _given(ctx: click.Context, name: str) -> bool:
    """True when the user gave option ``name`` on the command line (not its default)."""
    source = ctx.get_parameter_source(name)
    return source is not None and source != click.core.ParameterSource.DEFAULT


def _option(ctx: click.Context, name: str) -> str:
    return next(max(p.opts, key=len) for p in ctx.command.params if p.name == name)


def _refuse_ignored(ctx: click.Context, *, tiles: bool) -> None:
    """Refuse an option the chosen path (a picture, or a zarr map) would ignore, saying what to use."""
    ignored = _PICTURE_ONLY if tiles else _TILES_ONLY
    for name, instead in ignored.items():
        if _given(ctx, name):
            path = "with -o X.zarr (a map, tile by tile)" if tiles else "with a picture -o (.png, .pdf, ...)"
            raise click.UsageError(f"{_option(ctx, name)} does nothing {path}: {instead}.")
    if _given(ctx, "cam") and _given(ctx, "head_impl"):
        raise click.UsageError("--head-impl does nothing with --cam: the class activation map applies the "
                               "classifier's own head. Drop --head-impl.")
    if tiles and _given(ctx, "hide") and not _given(ctx, "preview"):
        raise click.UsageError("--hide applies to the --preview picture; -o X.zarr stores every class. "
                               "Add --preview, or drop --hide.")


def _refuse_tiff_stack(path: Path) -> None:
    """Pillow reads one page of a TIFF: refuse a stack or a channels-first TIFF it would misread."""
    if path.suffix.lower() not in (".tif", ".tiff"):
        return
    try:
        import tifffile

        with tifffile.TiffFile(path) as tif:
            axes, shape = tif.series[0].axes, tuple(tif.series[0].shape)
    except Exception:  # noqa: BLE001 - not readable by tifffile: Pillow says what it can read
        return
    if axes not in ("YX", "YXS"):
        raise FcconvError(
            f"{str(path)!r} has axes {axes} (shape {format_shape(shape)}): a picture -o reads one "
            "grayscale or RGB image (axes YX or YXS). Give -o X.zarr to read its axes, and --plane to "
            "pick one plane of a stack.")


def _labels(source: str | None, count: int) -> list[str]:
    if source is None:
        return [str(i) for i in range(count)]
    path = Path(source).expanduser()
    if path.is_file():
        names = [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    elif ":" in source:
        value = import_attribute(source)
        if isinstance(value, str) or not isinstance(value, Sequence):
            raise FcconvError(f"--labels {source} is a {type(value).__name__}, expected a sequence of names.")
        names = [str(v) for v in value]
    else:
        raise FcconvError(
            f"--labels {source!r}: no such file. Give a text file with one class name per line, or "
            "package.module:NAMES."
        )
    if len(names) < count:
        raise FcconvError(
            f"--labels has {len(names)} names; the model has {count} classes. Give one per class."
        )
    return names[:count]


def _hidden(text: str, names: list[str]) -> set[int]:
    hidden = set()
    for name in (n.strip() for n in text.split(",") if n.strip()):
        if name not in names:
            listed = ", ".join(names[:12]) + (", ..." if len(names) > 12 else "")
            raise FcconvError(f"--hide {name!r} is not a class name; the names are {listed} (see --labels).")
        hidden.add(names.index(name))
    return hidden


def _normalize(image: Tensor, mean: tuple[float, ...] | None, std: tuple[float, ...] | None) -> Tensor:
    channels = image.shape[0]
    for name, values in (("--mean", mean), ("--std", std)):
        if values is not None and len(values) not in (1, channels):
            raise click.BadParameter(f"give 1 or {channels} values (one per channel); got {len(values)}.",
                                     param_hint=name)
    if std is not None and any(s == 0 for s in std):
        raise click.BadParameter("values must not be 0.", param_hint="--std")
    view = (-1, 1, 1)
    if mean is not None:
        image = image - torch.tensor(mean).view(view)
    if std is not None:
        image = image / torch.tensor(std).view(view)
    return image


@dataclass(frozen=True)
class _Cells:
    """Where the cells of a map lie: the crop of cell ``(i, j)``, and the step between cells."""

    window_of: Callable[[tuple[int, int]], tuple[Any, ...]]
    stride: tuple[Any, ...]


def _draw(image: Tensor, winner: Tensor, confidence: Tensor, cells: _Cells, labels: list[str],
          hidden: set[int], title: str, alpha: float, path: Path) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.patches import Patch, Rectangle

    from fcconv.demo.picture import class_colour, draw_score_map

    grid_h, grid_w = winner.shape
    height, width = image.shape[1:]
    top0, left0, bottom0, right0 = cells.window_of((0, 0))
    stride_y, stride_x = cells.stride
    cy, cx = (top0 + bottom0) / 2 - 0.5, (left0 + right0) / 2 - 0.5  # centre of cell (0, 0)

    scale = 8.0 / max(height, width)
    figure = Figure(figsize=(max(4.0, width * scale + 2.5), max(3.0, height * scale + 1.0)), dpi=100)
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    shown = image.permute(1, 2, 0).clamp(0, 1).numpy()
    if shown.shape[2] == 1:
        axes.imshow(shown[..., 0], cmap="gray", vmin=0, vmax=1)
    else:
        axes.imshow(shown)
    # visible even where no class is sure
    draw_score_map(axes, winner, confidence, cells.window_of, cells.stride,
                   opacity=lambda c: alpha * (0.25 + 0.75 * c), hidden=hidden)
    axes.add_patch(Rectangle((left0 - 0.5, top0 - 0.5), right0 - left0, bottom0 - top0, fill=False,
                             edgecolor="white", linestyle="--", linewidth=1.2))
    if grid_h * grid_w <= 400:
        for i in range(grid_h):
            for j in range(grid_w):
                if confidence[i, j] >= 0.5 and int(winner[i, j]) not in hidden:
                    axes.text(cx + j * stride_x, cy + i * stride_y, labels[int(winner[i, j])][:3],
                              ha="center", va="center", fontsize=6, color="black")
    axes.set_xlim(-0.5, width - 0.5)
    axes.set_ylim(height - 0.5, -0.5)
    axes.set_title(title, fontsize=9)
    classes = sorted(set(winner.flatten().tolist()) - hidden)
    handles = [Patch(color=class_colour(c), label=labels[c]) for c in classes][:20]
    axes.legend(handles=handles, loc="upper left", bbox_to_anchor=(1.01, 1), fontsize=7,
                title="winning class", title_fontsize=7, frameon=False)
    figure.tight_layout()
    with atomic_output(path, what="the heatmap") as tmp:
        figure.savefig(tmp, format=image_format(path))


@dataclass(frozen=True)
class _Map:
    scores: Tensor  # (1, classes, H', W'), float32 on the CPU
    cells: _Cells
    title: str
    summary: str


def _convert(module: nn.Module, input_shape: tuple[int, ...], head_impl: str, quiet: bool) -> nn.Module:
    from fcconv.models import convolutionalize

    with step("Convolutionalizing", quiet=quiet):
        return convolutionalize(as_fcn_source(module), input_shape, head_impl=head_impl)


def _dense_map(fcn: nn.Module | None, module: nn.Module, name: str, input_shape: tuple[int, ...],
               head_impl: str, x: Tensor, target: torch.device, quiet: bool) -> _Map:
    """The score map of windows: the model convolutionalized (or the converted FCN ``fcn``)."""
    if fcn is None:
        fcn = _convert(module, input_shape, head_impl, quiet)
    window = tuple(fcn.window)  # type: ignore[arg-type]
    size = tuple(x.shape[2:])
    if any(s < w for s, w in zip(size, window)):
        fail(f"The image is {size[1]}x{size[0]} pixels, smaller than the model's window "
             f"{window[1]}x{window[0]}: give a larger image, or --scale it up.")
    with step("Computing the dense map", quiet=quiet), torch.inference_mode():
        scores = fcn.to(target)(x.to(target)).float().cpu()
    if scores.ndim != 4 or scores.shape[0] != 1:
        fail(f"The converted model returned a {tuple(scores.shape)} tensor; heatmap needs class scores "
             "(1, classes, H, W). Is MODEL a classifier?")
    grid, stride = tuple(scores.shape[2:]), tuple(fcn.stride)  # type: ignore[arg-type]
    window_of = fcn.window_of
    cells = _Cells(lambda cell: window_of(cell, size), stride)  # type: ignore[operator]
    title = (f"{name}: {grid[0]}x{grid[1]} cells, stride {format_shape(stride)}, window "
             f"{format_shape(window)} (dashed)")
    summary = (f"Image {size[1]}x{size[0]}, window {format_shape(window)}, stride {format_shape(stride)}: "
               f"a {grid[0]}x{grid[1]} map ({grid[0] * grid[1]} windows, one pass).")
    return _Map(scores, cells, title, summary)


def _cam_map(module: nn.Module, name: str, x: Tensor, target: torch.device, quiet: bool) -> _Map:
    """The exact class activation map: the affine head applied at each position, certified."""
    from fcconv.models import class_activation_map

    with step("Computing the class activation map (certified in float64)", quiet=quiet):
        cam = class_activation_map(module.to(target), x.to(target))
    scores = cam.scores.detach().float().cpu()
    size, grid = tuple(x.shape[2:]), tuple(scores.shape[2:])
    sy, sx = size[0] / grid[0], size[1] / grid[1]
    cells = _Cells(lambda c: (c[0] * sy, c[1] * sx, (c[0] + 1) * sy, (c[1] + 1) * sx), (sy, sx))
    title = f"{name}: class activation map, {grid[0]}x{grid[1]} cells of {sy:.4g}x{sx:.4g} px (dashed)"
    summary = (f"Image {size[1]}x{size[0]}: a {grid[0]}x{grid[1]} class activation map whose mean is the "
               f"model's output (certified in float64: {cam.report.float64_max_rel if cam.report else 0:.1e} "
               "relative difference).")
    return _Map(scores, cells, title, summary)


@click.command(
    "heatmap",
    epilog="""\b
Examples:
  fcconv demo --canvas canvas.png      (a test image for the embedded model: white ink on black)
  fcconv heatmap fcconv.demo.digits:load_digits_model canvas.png --input 1,12,12 \\
      --labels fcconv.demo.digits:CLASS_NAMES --hide background -o digits-map.png
  fcconv heatmap weights.pt street.jpg --factory torchvision:resnet18 --input 3,224,224 \\
      --mean 0.485,0.456,0.406 --std 0.229,0.224,0.225 -o map.png
  fcconv heatmap resnet18-fcn.pt photo.jpg -o map.png   (a file from fcconv convert --to fcn)""",
)
@click.argument("model")
@click.argument("image", type=click.Path(path_type=Path))
@click.option("-o", "--output", "output",
              type=MapOutput(what="the map", suffixes=(*IMAGE_SUFFIXES, ".zarr")), required=True,
              help="The picture to write (.png; .pdf, .svg and .jpg work too), or a .zarr map: then IMAGE "
                   "(a TIFF or zarr) is mapped tile by tile, and re-running resumes.")
@click.option("--input", "-i", "input_shape", type=InputShape(),
              help="The model's training input shape C,H,W: the window each map cell classifies.")
@click.option("--factory", metavar="REF", help="For a checkpoint MODEL: the factory that builds the model.")
@click.option("--kwargs", default="", metavar="'K=V, ...'", help="Keyword arguments for the factory.")
@click.option("--mean", type=NumberList(), help="Per-channel mean subtracted from pixels in [0, 1].")
@click.option("--std", type=NumberList(), help="Per-channel standard deviation pixels are divided by.")
@click.option("--labels", "--class-names", "labels", metavar="FILE|REF",
              help="Class names: a text file, one per line, or package.module:NAMES.")
@click.option("--hide", metavar="NAME,...", default="",
              help="Classes not to colour, e.g. --hide background.")
@click.option("--scale", type=click.FloatRange(min=0, min_open=True), default=1.0, show_default=True,
              help="With a picture -o: resize the image by this factor first.")
@click.option("--alpha", type=click.FloatRange(0, 1), default=0.6, show_default=True,
              help="With a picture -o: opacity of the overlay at confidence 1 (a quarter of it at 0).")
@click.option("--head-impl", "--head", "head_impl", type=click.Choice(HEAD_IMPLS), default="auto",
              show_default=True,
              help="How the convs of the converted head compute (same result; --head is the old name).")
@click.option("--top", type=click.IntRange(min=1), default=5, show_default=True,
              help="With a picture -o: classes in the summary.")
@click.option("--device", default="cpu", show_default=True, help="Where to run the model, e.g. cuda.")
@click.option("--tile", type=click.IntRange(min=1),
              help="With -o X.zarr: streaming: the widest strip, halo included (default: as wide as "
                   "about 1.5 GB of row buffers allows); halo tiles: the largest block (default 2048).")
@click.option("--method", type=click.Choice(["auto", "stream", "tiles"]), default="auto", show_default=True,
              help="With -o X.zarr: stream rows (each activation computed about once), halo tiles, or "
                   "auto: stream where the model allows it.")
@click.option("--force", is_flag=True,
              help="With -o X.zarr: run halo tiles whose recompute factor exceeds 4.")
@click.option("--preview", type=OutputPath(), help="With -o X.zarr: a small PNG of the map over the image.")
@click.option("--level", type=click.IntRange(min=0), default=0, help="With -o X.zarr: the pyramid level.")
@click.option("--workers", type=click.IntRange(min=1), help="With -o X.zarr: run on a local dask cluster.")
@click.option("--scheduler", metavar="ADDRESS", help="With -o X.zarr: run on this dask scheduler.")
@click.option("--overwrite", is_flag=True, help="With -o X.zarr: replace a map of another run.")
@click.option("--layout", type=click.Choice(("CHW", "HWC")),
              help="With -o X.zarr: channels first (CHW) or last (HWC). Default: the file's axes (a TIFF "
                   "states them: YXS is HWC, CYX is CHW), else CHW.")
@click.option("--plane", metavar="K|AXIS=K,...",
              help="With -o X.zarr: the plane of a stack to map (a z-stack, a time series): its index, "
                   "or one per stack axis, e.g. --plane T=0,Z=3.")
@click.option("--wait", is_flag=True,
              help="With -o X.zarr: wait for another run writing the same map, instead of stopping.")
@click.option("--cam", is_flag=True,
              help="Draw the exact class activation map (the head at each position of the last feature "
                   "map, whose mean is the model's output) instead of the map of windows.")
@slide_options
@click.option("-q", "--quiet", is_flag=True, help="Print only errors.")
def command(model: str, image: Path, output: Path, input_shape: tuple[int, ...] | None, factory: str | None,
            kwargs: str, mean: tuple[float, ...] | None, std: tuple[float, ...] | None, labels: str | None,
            hide: str, scale: float, alpha: float, head_impl: str, top: int, device: str, tile: int | None,
            method: str, force: bool, preview: Path | None, level: int, workers: int | None,
            scheduler: str | None, overwrite: bool, layout: str | None, plane: str | None, wait: bool,
            cam: bool, quiet: bool, **slides: Any) -> None:
    """Draw the dense class map of the classifier MODEL over IMAGE into OUTPUT.

    MODEL follows the loading rules of every command (torchvision:NAME, package.module:factory, a
    checkpoint with --factory, or a file from fcconv convert --to fcn). Pixels are read in [0, 1],
    then --mean and --std, if given, normalise them. With --cam, the map is the exact class
    activation map of a global-average-pool head instead (see docs/cam.md).
    """
    _refuse_ignored(click.get_current_context(), tiles=is_map_output(output))
    if not image.is_file() and not is_map_output(output):
        fail(f"Image {str(image)!r} not found. Check the path.")
    with step(f"Loading {model}", quiet=quiet):
        loaded = load_model(model, factory=factory, kwargs=kwargs)
    converted = loaded.saved.get("to") == "fcn"
    if input_shape is None and converted:
        input_shape = tuple(int(s) for s in loaded.saved["input_shape"])
    if input_shape is None:
        raise click.UsageError(
            "Missing option '--input': the model's training input shape, e.g. --input 3,224,224."
        )
    if len(input_shape) != 3:
        raise click.BadParameter(f"heatmap needs images: a shape C,H,W; got {format_shape(input_shape)}.",
                                 param_hint="--input")
    if converted and _given(click.get_current_context(), "head_impl"):
        raise click.UsageError(f"--head-impl applies when heatmap converts the model; {model} is already "
                               "converted (its head computes as fcconv convert chose). Drop --head-impl, or "
                               "convert again with fcconv convert --head-impl.")
    if is_map_output(output):
        from fcconv.cli.tiles import parse_plane, run

        fcn = loaded.module if converted else _convert(loaded.module, input_shape, head_impl, quiet)
        names = _labels(labels, int(fcn.num_classes))  # type: ignore[arg-type]
        return run(fcn.to(torch.device(device)), image, output, tile=tile, method=method, force=force,
                   level=level, mean=mean, std=std,
                   preview=preview, labels=names, hidden=_hidden(hide, names), workers=workers,
                   scheduler=scheduler, overwrite=overwrite, quiet=quiet, layout=layout,
                   plane=parse_plane(plane), wait=wait, class_names=None if labels is None else names,
                   **slides)
    pixels = load_image(image, input_shape[0], scale=scale)
    x = _normalize(pixels, mean, std).unsqueeze(0)
    target = torch.device(device)
    if cam:
        if converted:
            fail(f"--cam needs the classifier itself; {model} is a converted FCN. Pass the model "
                 "(e.g. torchvision:resnet18 or a checkpoint with --factory).")
        found = _cam_map(loaded.module, model, x, target, quiet)
    else:
        found = _dense_map(loaded.module if converted else None, loaded.module, model, input_shape,
                           head_impl, x, target, quiet)
    scores = found.scores
    probabilities = scores[0].softmax(0)
    confidence, winner = probabilities.max(0)
    names = _labels(labels, scores.shape[1])
    hidden = _hidden(hide, names)
    title = f"{found.title}, on {pixels.shape[2]}x{pixels.shape[1]} pixels"
    with step(f"Drawing {output}", quiet=quiet):
        _draw(pixels, winner, confidence, found.cells, names, hidden, title, alpha, output)

    click.echo(found.summary)
    counts = torch.bincount(winner.flatten(), minlength=scores.shape[1])
    ranked = [int(c) for c in counts.argsort(descending=True)[:top] if counts[c] > 0]
    click.echo("Top classes: " + ", ".join(
        f"{names[c]} ({int(counts[c])} cells, mean confidence {confidence[winner == c].mean():.2f})"
        for c in ranked
    ))
    click.echo(f"Wrote {output}")
