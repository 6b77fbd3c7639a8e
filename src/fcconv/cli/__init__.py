"""The ``fcconv`` command line: a thin click app that wires one module per command.

Each command lives in its own module (``fcconv.cli.explain``, ``fcconv.cli.convert``, ...) that
defines a click command named ``command``; the app imports it only when that command runs. Errors
print one line, ``Error: <message>``, and exit 1 (usage errors exit 2); ``FCCONV_DEBUG=1`` shows the
traceback.

Example:
    $ fcconv explain "Linear(25088, 4096)" --input 512,7,7
    $ python -m fcconv.cli convert torchvision:resnet18 --input 3,224,224 --to fcn -o resnet18-fcn.pt
"""

from __future__ import annotations

from collections.abc import Sequence

import click

from fcconv.cli._app import DEBUG_ENV, LazyGroup

__all__ = ["app", "main"]

#: name -> (module, short help): the registry of commands, imported only when used.
COMMANDS: dict[str, tuple[str, str]] = {
    "explain": ("fcconv.cli.explain", "Which equivalence holds for a layer on an input shape."),
    "convert": ("fcconv.cli.convert", "Convert a layer or a model and save it with its geometry."),
    "heatmap": ("fcconv.cli.heatmap", "Dense class map of a classifier over an image, as a PNG."),
    "verify": ("fcconv.cli.verify", "Certify that two models compute the same function."),
    "bench": ("fcconv.cli.bench", "Run the benchmarks in bench/ and print their ratios."),
    "demo": ("fcconv.cli.demo", "Watch a digit classifier become a detector (no download)."),
    "export": ("fcconv.cli.export", "Export a model to ONNX, checked in onnxruntime at several sizes."),
    "onnx": ("fcconv.cli.onnx", "Surgery on ONNX files: convolutionalize, linear-to-conv."),
    "view": ("fcconv.cli.view", "Show a map over its slide in a deep-zoom web page (localhost)."),
}


def _version() -> str:
    from fcconv import __version__

    return __version__


@click.group(
    cls=LazyGroup,
    lazy_commands=COMMANDS,
    context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 110},
    epilog=f"""\b
Examples:
  fcconv demo
  fcconv explain "Conv2d(4, 2, kernel_size=1)" --input 4,1,1
  fcconv convert torchvision:resnet18 --input 3,224,224 --to fcn -o resnet18-fcn.pt
  fcconv verify "Linear(25088, 4096)" linear-as-conv.pt --input 512,7,7

Set {DEBUG_ENV}=1 to see the full traceback of an error.""",
)
@click.version_option(_version(), "-V", "--version", prog_name="fcconv")
def app() -> None:
    """fcconv: perform, explain and certify the equivalence between fully connected and
    convolutional layers in PyTorch."""


def main(argv: Sequence[str] | None = None) -> None:
    """Run the command line (the ``fcconv`` console script); exits with the command's status."""
    app.main(args=list(argv) if argv is not None else None, prog_name="fcconv")
