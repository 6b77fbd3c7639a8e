"""``fcconv verify REFERENCE CANDIDATE``: certify that two models compute the same function.

Both arguments follow the loading rules of every command (torchvision names, import paths, layer
specs, weights-only checkpoints with a factory). A file written by ``fcconv convert`` rebuilds its own
structure: single layers from the layer spec it records, ``--to fcn`` outputs by converting the model
its recorded factory builds (override with ``--candidate-factory`` when that factory moved). Models
built from a name or spec get random weights from ``--seed``, the same on both sides, so
``fcconv verify "Linear(25088, 4096)" fc6-as-conv.pt`` compares the layer with its own conversion.
"""

from __future__ import annotations

import click
import torch

from fcconv._shapes import format_shape
from fcconv.cli._app import InputShape, step
from fcconv.cli._loading import LoadedModel, load_model

__all__ = ["command"]


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
  fcconv verify torchvision:resnet18 resnet18-fcn.pt --input 3,224,224 --grad
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
@click.option("--device", default="cpu", show_default=True, help="Where to run both models, e.g. cuda.")
@click.option("-q", "--quiet", is_flag=True, help="Print only the verdict line.")
def command(reference: str, candidate: str, input_shape: tuple[int, ...] | None, grad: bool,
            factory: str | None, reference_factory: str | None, candidate_factory: str | None,
            kwargs: str, seed: int, device: str, quiet: bool) -> None:
    """Certify that REFERENCE and CANDIDATE compute the same function.

    Runs both on seeded random inputs (several batches, large and negative values included), in
    float64 for the verdict and in their own dtype for the rounding bound, and prints the report.
    Exit status 0 when they are equivalent, 1 when they are not.
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
    from fcconv.verify import compare

    with step(f"Comparing on inputs {format_shape(shape)}", quiet=quiet):
        report = compare(ref.module.to(target), cand.module.to(target), shape, grad=grad, seed=seed)
    if not quiet:
        click.echo(str(report))
    verdict = "equivalent" if report.equivalent else "NOT equivalent"
    click.echo(f"{reference} vs {candidate} on {format_shape(shape)}: {verdict}")
    if not report.equivalent:
        click.get_current_context().exit(1)
