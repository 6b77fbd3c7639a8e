"""``fcconv export MODEL --input C,H,W [--to fcn] [--conv-only] [--static] [--certify T] -o model.onnx``.

Exports with :func:`fcconv.onnx.export`: the file is run in onnxruntime at the training size and
the other sizes the model accepts, compared with PyTorch within the derived float32 bound, a float64
export is run with onnx.reference for the verdict, and the file is written only when every check
passes. The report (sizes, max differences, float64 differences, op counts) is printed.
"""

from __future__ import annotations

from pathlib import Path

import click

from fcconv.cli._app import InputShape, OutputPath, step
from fcconv.cli._loading import as_fcn_source, load_model

__all__ = ["command"]


@click.command(
    "export",
    epilog="""\b
Examples:
  fcconv export torchvision:resnet18 --input 3,224,224 -o resnet18.onnx
  fcconv export torchvision:resnet18 --input 3,224,224 --to fcn --conv-only -o resnet18-fcn.onnx
  fcconv export resnet18-fcn.pt --input 3,224,224 -o resnet18-fcn.onnx
  fcconv export torchvision:vgg11 --input 3,224,224 --static -o vgg11-224.onnx

\b
Needs the onnx extra: pip install 'fcconv[onnx]'.""",
)
@click.argument("model")
@click.option("--input", "-i", "input_shape", type=InputShape(), required=True,
              help="Per-sample training input shape C,H,W.")
@click.option("--to", "to", type=click.Choice(["fcn"]), default=None,
              help="fcn: convolutionalize the model first (dense score maps at any size from its window).")
@click.option("--conv-only", is_flag=True, help="Every Gemm/MatMul becomes a 1x1 Conv; checked.")
@click.option("--static", is_flag=True, help="Fixed input shape (batch 1, the training size).")
@click.option("-o", "--output", "output", type=OutputPath(), required=True, help="The file to write (.onnx).")
@click.option("--factory", metavar="REF", help="For a checkpoint MODEL: what builds the model it fills.")
@click.option("--kwargs", default="", metavar="'K=V, ...'", help="Keyword arguments for the factory.")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of random weights.")
@click.option("--certify", type=click.Choice(["float64", "float32"]), default="float64", show_default=True,
              help="float64: the verdict, the file run in float64 with onnx.reference; "
                   "float32: onnxruntime only (for models too big for onnx.reference).")
@click.option("-q", "--quiet", is_flag=True, help="Print only errors.")
def command(model: str, input_shape: tuple[int, ...], to: str | None, conv_only: bool, static: bool,
            output: Path, factory: str | None, kwargs: str, seed: int, certify: str, quiet: bool) -> None:
    """Export MODEL to ONNX, checked in onnxruntime against PyTorch at several input sizes.

    MODEL is torchvision:NAME (random weights), package.module:factory, a file written by
    fcconv convert --to fcn, or a weights-only checkpoint with --factory.
    """
    import fcconv
    import fcconv.onnx

    with step(f"Loading {model}", quiet=quiet):
        module = load_model(model, factory=factory, kwargs=kwargs, seed=seed).module
    if to == "fcn":
        with step("Convolutionalizing", quiet=quiet):
            module = fcconv.convolutionalize(as_fcn_source(module), input_shape, head_impl="conv")
    with step(f"Exporting and checking {output}", quiet=quiet):
        report = fcconv.onnx.export(module, output, input_shape, dynamic=not static, conv_only=conv_only,
                                     certify=certify)
    if not quiet:
        click.echo(str(report))
