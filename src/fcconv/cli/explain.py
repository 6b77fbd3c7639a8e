"""``fcconv explain LAYER --input C,H,W``: which equivalence holds for a layer, in words and numbers."""

from __future__ import annotations

import dataclasses
import json

import click

from fcconv.cli._app import InputShape
from fcconv.cli._loading import load_model
from fcconv.cli._spec import build_layer, is_layer_spec
from fcconv.explain import explain

__all__ = ["command"]


@click.command(
    "explain",
    epilog="""\b
Examples:
  fcconv explain "Linear(25088, 4096)" --input 512,7,7
  fcconv explain "Conv2d(4, 2, kernel_size=1)" --input 4,1,1
  fcconv explain "Conv2d(16, 32, 3, stride=2, padding=1, bias=False)" --input 16,32,32
  fcconv explain "Conv1d(8, 8, 5, padding='same', padding_mode='reflect')" --input 8,100
  fcconv explain mypackage.layers:make_head --input 256,6,6 --json""",
)
@click.argument("layer")
@click.option("--input", "-i", "input_shape", type=InputShape(), required=True,
              help="Per-sample shape of the layer's input, C,H,W (for a Linear: of the tensor "
                   "flattened before it). Also 3x224x224.")
@click.option("--json", "as_json", is_flag=True, help="Print the explanation as JSON.")
def command(layer: str, input_shape: tuple[int, ...], as_json: bool) -> None:
    """Explain which Linear/conv equivalence holds for LAYER on inputs of one shape.

    LAYER is a layer spec with literal arguments, such as "Conv2d(16, 32, 3, stride=2)" or
    "Linear(25088, 4096)" (Linear, Conv1d/2d/3d, ConvTranspose1d/2d/3d; quote it for the shell),
    or a factory package.module:factory that returns one layer. The spec is parsed, never
    evaluated. Prints the equivalent layer, both parameter counts, the layer's matrix, and what
    stride and padding do to the equivalence.
    """
    # explain reads the structure only: a spec is built without weights, in no time.
    module = build_layer(layer, empty=True) if is_layer_spec(layer) else load_model(layer).module
    explanation = explain(module, input_shape)
    if as_json:
        fields = dataclasses.asdict(explanation)
        fields["density"] = explanation.density
        click.echo(json.dumps(fields, indent=2))
    else:
        click.echo(str(explanation))
