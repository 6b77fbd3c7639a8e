"""``fcconv convert MODEL --to fcn|linear|pointwise -o OUT``: convert and save, with the geometry.

What ``--to`` means:

* ``fcn``: the whole model becomes fully convolutional (:func:`fcconv.models.convolutionalize` at the
  training size ``--input``); a bare ``Linear`` stands for ``Linear(flatten(x))`` on ``--input`` and
  becomes the conv whose kernel covers it. Geometry: stride and window of the score map.
* ``linear``: one conv layer becomes the ``Linear`` equal to it on flattened inputs of shape
  ``--input`` (:func:`fcconv.conv_to_linear`).
* ``pointwise``: one ``Linear`` becomes the kernel-size-1 conv that applies it over the channels at
  every position (:func:`fcconv.linear_to_pointwise`); ``--input`` is optional and only picks
  Conv1d/2d/3d (default Conv2d) and checks the channels.

OUT is a ``torch.save`` dict of tensors and plain values, loadable with ``weights_only=True``:
``state_dict``, ``geometry``, ``to``, ``source``, ``structure`` (what builds the model again),
``kwargs``, ``input_shape``, ``head_impl``, ``module`` (a layer spec, for single layers),
``fcconv_version`` and ``fcconv_format``. It is written to a temporary file and renamed, so a failed
run leaves no partial file; the input is never written.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click
import torch
from torch import nn
from torch.nn.modules.conv import _ConvNd

from fcconv import __version__
from fcconv._io import atomic_output
from fcconv._shapes import format_shape
from fcconv.cli._app import InputShape, OutputPath, fail, step
from fcconv.cli._loading import CONVERT_FORMAT, LoadedModel, as_fcn_source, load_model
from fcconv.cli._spec import layer_spec
from fcconv.layers import conv_output_shape, conv_to_linear, linear_to_pointwise
from fcconv.models.modules import HEAD_IMPLS

__all__ = ["command", "convert_loaded"]

TARGETS = ("fcn", "linear", "pointwise")
#: What OUT may be called: convert writes a torch.save checkpoint, nothing else.
SUFFIXES = (".pt", ".pth")
FORMAT_VERSION = 1


def _describe(module: nn.Module) -> str:
    count = sum(1 for _ in module.modules())
    return f"{type(module).__name__} ({count} modules)" if count > 1 else repr(module)


Converted = tuple[nn.Module, dict[str, Any]]


def _to_fcn(module: nn.Module, input_shape: tuple[int, ...] | None, head_impl: str) -> Converted:
    if input_shape is None:
        fail("--to fcn needs --input C,H,W, the training input size of the model, e.g. --input 3,224,224.")
    from fcconv.models import convolutionalize

    fcn = convolutionalize(as_fcn_source(module), input_shape, head_impl=head_impl)
    return fcn, dict(fcn.geometry())


def _to_linear(module: nn.Module, input_shape: tuple[int, ...] | None) -> Converted:
    if isinstance(module, nn.Linear):
        fail("MODEL is already a Linear; --to pointwise makes it a 1x1 conv, --to fcn the conv whose "
             "kernel covers --input.")
    if not isinstance(module, _ConvNd):
        fail(f"--to linear converts one conv layer; MODEL is a {_describe(module)}. Use --to fcn for a "
             "whole model, or give one layer (a spec such as 'Conv2d(3, 8, 3)' or a factory returning it).")
    if input_shape is None:
        fail("--to linear needs --input C,H,W: a conv's matrix depends on the input size, "
             "e.g. --input 3,32,32.")
    linear = conv_to_linear(module, input_shape)
    geometry = {"input_shape": tuple(input_shape), "output_shape": conv_output_shape(module, input_shape),
                "in_features": linear.in_features, "out_features": linear.out_features}
    return linear, geometry


def _to_pointwise(module: nn.Module, input_shape: tuple[int, ...] | None) -> Converted:
    if isinstance(module, _ConvNd):
        fail("MODEL is already a convolution; --to linear gives its matrix as a Linear on --input.")
    if not isinstance(module, nn.Linear):
        fail(f"--to pointwise converts one Linear layer; MODEL is a {_describe(module)}. Use --to fcn "
             "for a whole model.")
    ndim = 2
    if input_shape is not None:
        ndim = len(input_shape) - 1
        if input_shape[0] != module.in_features:
            fail(f"--to pointwise applies the Linear over channels: --input must have "
                 f"C = in_features = {module.in_features}; got {format_shape(input_shape)}.")
    conv = linear_to_pointwise(module, ndim=ndim)
    geometry = {"kernel_size": tuple(conv.kernel_size), "stride": tuple(conv.stride),
                "in_channels": conv.in_channels, "out_channels": conv.out_channels}
    return conv, geometry


def convert_loaded(loaded: LoadedModel, to: str, input_shape: tuple[int, ...] | None,
                   head_impl: str = "auto") -> dict[str, Any]:
    """Convert a loaded model and return the dict that ``fcconv convert`` saves.

    Raises:
        FcconvError: when the model cannot become what ``to`` asks.
    """
    if to == "fcn":
        result, geometry = _to_fcn(loaded.module, input_shape, head_impl)
    elif to == "linear":
        result, geometry = _to_linear(loaded.module, input_shape)
    else:
        result, geometry = _to_pointwise(loaded.module, input_shape)
    payload: dict[str, Any] = {
        CONVERT_FORMAT: FORMAT_VERSION,
        "fcconv_version": __version__,
        "to": to,
        "source": loaded.source,
        "structure": loaded.structure,
        "kwargs": loaded.kwargs,
        "input_shape": tuple(input_shape) if input_shape is not None else None,
        "geometry": geometry,
        "state_dict": {k: v.detach().cpu() for k, v in result.state_dict().items()},
    }
    if to == "fcn":
        payload["head_impl"] = head_impl
    else:
        payload["module"] = layer_spec(result)
    return payload


def _same_file(a: Path, b: str) -> bool:
    try:
        return a.exists() and Path(b).exists() and a.samefile(b)
    except OSError:
        return False


@click.command(
    "convert",
    epilog="""\b
Examples:
  fcconv convert torchvision:resnet18 --input 3,224,224 --to fcn -o resnet18-fcn.pt
  fcconv convert "Linear(25088, 4096)" --input 512,7,7 --to fcn -o fc6-as-conv.pt
  fcconv convert "Conv2d(3, 8, 3, padding=1)" --input 3,16,16 --to linear -o conv-matrix.pt
  fcconv convert "Linear(512, 10)" --to pointwise -o head-1x1.pt
  fcconv convert weights.pt --factory mypackage.models:small_cnn --input 1,28,28 --to fcn -o fcn.pt

\b
The output loads with torch.load(OUT, weights_only=True); fcconv verify reads it directly.""",
)
@click.argument("model")
@click.option("--to", "to", type=click.Choice(TARGETS), required=True,
              help="fcn: the whole model, fully convolutional; linear: one conv as its Linear on "
                   "--input; pointwise: one Linear as a kernel-1 conv.")
@click.option("--input", "-i", "input_shape", type=InputShape(),
              help="Per-sample input shape C,H,W: the training size for fcn, the conv's input for linear.")
@click.option("-o", "--output", "output", type=OutputPath(what="a torch.save checkpoint", suffixes=SUFFIXES),
              required=True,
              help="The file to write: a torch.save checkpoint, named .pt or .pth.")
@click.option("--factory", metavar="REF",
              help="For a checkpoint MODEL: the torchvision:NAME or package.module:factory that builds "
                   "the model its weights fill.")
@click.option("--kwargs", default="", metavar="'K=V, ...'", help="Keyword arguments for the factory.")
@click.option("--head-impl", "--head", "head_impl", type=click.Choice(HEAD_IMPLS), default="auto",
              show_default=True,
              help="fcn only: how the convs that replace the Linear layers compute: as convs, as "
                   "unfold+matmul, or the fastest for the device (--head is the old name).")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of random weights.")
@click.option("-q", "--quiet", is_flag=True, help="Print only errors.")
def command(model: str, to: str, input_shape: tuple[int, ...] | None, output: Path, factory: str | None,
            kwargs: str, head_impl: str, seed: int, quiet: bool) -> None:
    """Convert MODEL and save it, with its geometry, to OUTPUT.

    MODEL is torchvision:NAME (random weights, nothing downloaded), package.module:factory, a
    layer spec such as "Linear(25088, 4096)", or a weights-only checkpoint with --factory.
    """
    if _same_file(output, model):
        fail(f"-o {str(output)!r} is the input file; fcconv never overwrites its input. Choose another path.")
    with step(f"Loading {model}", quiet=quiet):
        loaded = load_model(model, factory=factory, kwargs=kwargs, seed=seed)
    with step(f"Converting to {to}", quiet=quiet):
        payload = convert_loaded(loaded, to, input_shape, head_impl)
    with step(f"Writing {output}", quiet=quiet), atomic_output(output, what="a torch.save checkpoint") as tmp:
        torch.save(payload, tmp)
    if not quiet:
        geometry = ", ".join(f"{k} {_plain(v)}" for k, v in payload["geometry"].items())
        size = output.stat().st_size / 2**20
        click.echo(f"Wrote {output} ({size:.1f} MiB): {model} --to {to}; {geometry}")


def _plain(value: Any) -> str:
    return format_shape(value) if isinstance(value, tuple) else str(value)
