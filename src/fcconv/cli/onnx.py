"""``fcconv onnx convolutionalize|linear-to-conv SRC.onnx -o DST.onnx``: surgery on ONNX files.

Both commands read a file written by any exporter, never write it, check the result in
onnxruntime and in float64 (onnx.reference) and write DST atomically only when the checks pass;
they print what was replaced, the sizes run, the max differences and the op counts.
"""

from __future__ import annotations

from pathlib import Path

import click

from fcconv.cli._app import InputShape, OutputPath, fail, step

__all__ = ["command"]


def _same_file(a: Path, b: Path) -> bool:
    try:
        return b.exists() and a.exists() and a.samefile(b)
    except OSError:
        return False


@click.group(
    "onnx",
    epilog="""\b
Examples:
  fcconv onnx convolutionalize resnet18.onnx --input 3,224,224 -o resnet18-fcn.onnx
  fcconv onnx linear-to-conv model.onnx -o model-conv-only.onnx

\b
Needs the onnx extra: pip install 'fcconv[onnx]'.""",
)
def command() -> None:
    """Surgery on ONNX files written by any exporter (torchvision, timm, Keras...)."""


@command.command("convolutionalize")
@click.argument("src", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--input", "-i", "input_shape", type=InputShape(), required=True,
              help="Per-sample training input shape C,H,W of SRC (H,W,C for a channels-last file).")
@click.option("-o", "--output", "output", type=OutputPath(), required=True, help="The file to write (.onnx).")
@click.option("--certify", type=click.Choice(["float64", "float32"]), default="float64", show_default=True,
              help="float64: the verdict, the file run in float64 with onnx.reference; "
                   "float32: onnxruntime only (for models too big for onnx.reference).")
@click.option("-q", "--quiet", is_flag=True, help="Print only errors.")
def convolutionalize(src: Path, input_shape: tuple[int, ...], output: Path, certify: str,
                     quiet: bool) -> None:
    """Turn the classifier SRC into a fully convolutional model giving score maps (dynamic H, W).

    \b
    Example:
      fcconv onnx convolutionalize resnet18.onnx --input 3,224,224 -o resnet18-fcn.onnx
    """
    import fcconv.onnx

    if _same_file(src, output):
        fail(f"-o {str(output)!r} is the input file; fcconv never overwrites its input. Choose another path.")
    with step(f"Convolutionalizing {src}", quiet=quiet):
        report = fcconv.onnx.convolutionalize(src, output, input_shape, certify=certify)
    if not quiet:
        click.echo(str(report))


@command.command("linear-to-conv")
@click.argument("src", type=click.Path(dir_okay=False, path_type=Path))
@click.option("-o", "--output", "output", type=OutputPath(), required=True, help="The file to write (.onnx).")
@click.option("--certify", type=click.Choice(["float64", "float32"]), default="float64", show_default=True,
              help="float64: the verdict, the file run in float64 with onnx.reference; "
                   "float32: onnxruntime only (for models too big for onnx.reference).")
@click.option("--allow-partial", is_flag=True,
              help="Write OUTPUT even when a Gemm / MatMul is left (each is named with the reason); "
                   "without it a file with one left is refused.")
@click.option("-q", "--quiet", is_flag=True, help="Print only errors.")
def linear_to_conv(src: Path, output: Path, certify: str, allow_partial: bool, quiet: bool) -> None:
    """Turn every Gemm / MatMul(+Add) with constant weights in SRC into a 1x1 Conv.

    Every output of SRC is compared. A node left (a computed weight, a rank shape inference cannot
    give) is named with the reason; the command then fails unless --allow-partial.

    \b
    Example:
      fcconv onnx linear-to-conv model.onnx -o model-conv-only.onnx
    """
    import fcconv.onnx

    if _same_file(src, output):
        fail(f"-o {str(output)!r} is the input file; fcconv never overwrites its input. Choose another path.")
    with step(f"Rewriting {src}", quiet=quiet):
        report = fcconv.onnx.linear_to_conv(src, output, certify=certify, allow_partial=allow_partial)
    if not quiet:
        click.echo(str(report))
