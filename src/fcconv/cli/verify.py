"""``fcconv verify REFERENCE CANDIDATE``: certify that two models compute the same function.

Both arguments follow the loading rules of every command (torchvision names, import paths, layer
specs, weights-only checkpoints with a factory). A file written by ``fcconv convert`` rebuilds its own
structure: single layers from the layer spec it records, ``--to fcn`` outputs by converting the model
its recorded factory builds (override with ``--candidate-factory`` when that factory moved). Models
built from a name or spec get random weights from ``--seed``, the same on both sides, so
``fcconv verify "Linear(25088, 4096)" fc6-as-conv.pt`` compares the layer with its own conversion.
"""

from __future__ import annotations

import math
import sys

import click
import torch
from torch import Tensor, nn

from fcconv._shapes import format_shape
from fcconv.cli._app import InputShape, for_the_command_line, step
from fcconv.cli._loading import LoadedModel, as_fcn_source, load_model
from fcconv.errors import FcconvError, ModuleRunError

__all__ = ["OverChannels", "adapt_to_input", "command"]


class OverChannels(nn.Module):
    """A Linear applied over the channels at every position: ``(N, C, *spatial)`` in and out."""

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        self.linear = linear

    def forward(self, x: Tensor) -> Tensor:
        return self.linear(x.movedim(1, -1)).movedim(-1, 1)


def adapt_to_input(module: nn.Module, input_shape: tuple[int, ...]) -> tuple[nn.Module, str | None]:
    """Let a bare ``nn.Linear`` take inputs ``(N, *input_shape)``, the layout every command uses.

    A Linear with ``in_features == prod(input_shape)`` gets the input flattened (the Linear a
    covering conv equals); one with ``in_features == C`` is applied over channels at every position
    (the Linear a pointwise conv equals). Other modules are returned as they are.

    Returns:
        The module to compare, and a note saying what was done (or None).
    """
    if type(module) is not nn.Linear:
        return module, None
    if module.in_features == math.prod(input_shape):
        return as_fcn_source(module), "it gets each input flattened"
    if module.in_features == input_shape[0]:
        return OverChannels(module).eval(), "it is applied over the channels at every position"
    return module, None


#: From this many parameters (both models) the comparison takes seconds to minutes: a progress bar
#: over its batches goes to stderr even when it is not a terminal (piped, logged).
_LARGE = 1_000_000


def _parameters(*modules: nn.Module) -> int:
    return sum(p.numel() for m in modules for p in m.parameters())


def _saved_shape(*loaded: LoadedModel) -> tuple[int, ...] | None:
    for model in loaded:
        shape = model.saved.get("input_shape")
        if shape:
            return tuple(int(s) for s in shape)
    return None


@click.command(
    "verify",
    epilog="""\b
Examples:
  fcconv convert "Linear(25088, 4096)" --input 512,7,7 --to fcn -o fc6-as-conv.pt
  fcconv verify "Linear(25088, 4096)" fc6-as-conv.pt
  fcconv convert fcconv.demo.digits:load_digits_model --input 1,12,12 --to fcn -o digits-fcn.pt
  fcconv verify fcconv.demo.digits:load_digits_model digits-fcn.pt --grad
  fcconv verify ref.pt cand.pt --factory mypackage.models:small_cnn --input 1,28,28

\b
Exit status: 0 when equivalent, 1 when not (or on an error), 2 on a usage error.""",
)
@click.argument("reference")
@click.argument("candidate")
@click.option("--input", "-i", "input_shape", type=InputShape(),
              help="Per-sample input shape C,H,W (default: the one a file from fcconv convert records).")
@click.option("--grad", is_flag=True, help="Also compare the gradients with respect to the inputs.")
@click.option("--factory", metavar="REF", help="Factory for checkpoints on both sides.")
@click.option("--reference-factory", metavar="REF", help="Factory for a REFERENCE checkpoint.")
@click.option("--candidate-factory", metavar="REF",
              help="Factory for a CANDIDATE checkpoint, or the source model of a convert --to fcn file.")
@click.option("--kwargs", default="", metavar="'K=V, ...'", help="Keyword arguments for the factories.")
@click.option("--seed", type=int, default=0, show_default=True,
              help="Seed of random weights and of the random inputs.")
@click.option("--parameter-rounding", is_flag=True,
              help="Allow one rounding of every parameter in the float64 verdict: for conversions that "
                   "compute weights (folded padding taps, fused batch norm). Weakens the verdict.")
@click.option("--device", default="cpu", show_default=True, help="Where to run both models, e.g. cuda.")
@click.option("--dtype", type=click.Choice(["float32", "bfloat16", "float16"]), default=None,
              help="Run copies of both models in this precision (default: as loaded); the error ratio "
                   "then says whether the candidate is as accurate in it as the reference.")
@click.option("-q", "--quiet", is_flag=True, help="Print only the verdict line.")
def command(reference: str, candidate: str, input_shape: tuple[int, ...] | None, grad: bool,
            factory: str | None, reference_factory: str | None, candidate_factory: str | None,
            kwargs: str, seed: int, parameter_rounding: bool, device: str, dtype: str | None,
            quiet: bool) -> None:
    """Certify that REFERENCE and CANDIDATE compute the same function.

    Runs both on seeded random inputs (several batches, large and negative values included), in
    float64 for the verdict and in their own dtype (or --dtype) for the error ratio and the rounding
    bound, and prints the report.
    Exit status 0 when they are equivalent, 1 when they are not. Whole models take a while (each
    batch runs in float64 with a rounding analysis; minutes for resnet18 with --grad): from 1M
    parameters a progress bar goes to stderr, also when it is piped.

    Inputs are (N, C, *spatial) for both; a bare Linear gets them flattened, or applied over the
    channels when its in_features is C. Outputs are compared flattened.
    """
    try:
        target = torch.device(device)
    except RuntimeError:
        raise click.BadParameter(f"expected a torch device such as cpu or cuda:0; got {device!r}.",
                                 param_hint="--device") from None
    with step(f"Loading {reference}", quiet=quiet):
        ref = load_model(reference, factory=reference_factory or factory, kwargs=kwargs, seed=seed)
    with step(f"Loading {candidate}", quiet=quiet):
        cand = load_model(candidate, factory=candidate_factory or factory, kwargs=kwargs, seed=seed)
    shape = input_shape or _saved_shape(cand, ref)
    if shape is None:
        raise click.UsageError(
            "Missing option '--input': give the per-sample input shape, e.g. --input 3,32,32."
        )
    from fcconv.certify import compare

    modules = []
    for name, loaded in (("REFERENCE", ref), ("CANDIDATE", cand)):
        module, note = adapt_to_input(loaded.module, shape)
        modules.append(module.to(target))
        if note and not quiet:
            click.echo(f"{name} is a Linear on inputs {format_shape(shape)}: {note}.")
    bar = not quiet and (sys.stderr.isatty() or _parameters(*modules) >= _LARGE)
    with step(f"Comparing on inputs {format_shape(shape)}", quiet=quiet or bar):
        try:
            report = compare(modules[0], modules[1], input_shape=shape, grad=grad, seed=seed,
                             parameter_rounding=parameter_rounding, progress=bar,
                             dtype=None if dtype is None else getattr(torch, dtype))
        except ModuleRunError as error:
            name = reference if error.role == "reference" else candidate
            raise FcconvError(
                f"Running the {error.role} {name} on inputs of shape {format_shape(error.input_shape)} "
                f"failed: {error.cause}. Both models get inputs of shape (N, *--input): give --input the "
                "per-sample shape both accept, e.g. the candidate written by `fcconv convert` for the "
                "reference."
            ) from None
    if not quiet:  # the reason's advice about Python arguments becomes the command line's
        click.echo("\n".join(for_the_command_line(line) for line in str(report).splitlines()))
    verdict = "equivalent" if report.equivalent else "NOT equivalent"
    click.echo(f"{reference} vs {candidate} on {format_shape(shape)}: {verdict}")
    if not report.equivalent:
        click.get_current_context().exit(1)
