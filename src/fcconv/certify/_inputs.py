"""What `compare` runs on: checked modules, input batches, output maps, float64 copies."""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from fcconv._shapes import check_input_shape, stochastic_in_training
from fcconv.errors import FcconvError

__all__ = ["as_float64", "check_module", "float64_copies", "input_batches", "output_maps", "round_through"]

# Per-sample shapes become these batches, in this order, of ``_BATCH_SIZE`` samples each.
_BATCH_SIZE = 2
_GENERATED = ("normal", "normal x1e3", "negative", "uniform [0, 1)")
_F64 = torch.float64


def check_module(module: object, role: str) -> nn.Module:
    """``module`` if it is an ``nn.Module`` that gives the same output twice, else raise."""
    if not isinstance(module, nn.Module):
        raise FcconvError(
            f"compare expects the {role} to be a torch.nn.Module; got {type(module).__name__}. "
            "Pass the module itself (e.g. nn.Linear(4, 2)), not its output or a state_dict."
        )
    stochastic = stochastic_in_training(module)
    if stochastic:
        name = stochastic[0]
        where = f" at '{name}'" if name else ""
        raise FcconvError(
            f"The {role} is in training mode and contains {type(module.get_submodule(name)).__name__}"
            f"{where}: its outputs are random (dropout) or depend on the batch and update running "
            "statistics (batch norm), so no two runs can be compared. compare does not change modes "
            f"for you: call {role}.eval() first."
        )
    return module


def as_float64(x: Tensor) -> Tensor:
    """A floating input in float64 (exact: every dtype converts exactly); integer inputs as they are."""
    return x.to(_F64) if x.is_floating_point() else x


def round_through(x: Tensor, dtypes: Sequence[torch.dtype], final: torch.dtype) -> Tensor:
    """Round ``x`` through every dtype so that the result is exact in each of them."""
    for dtype in dtypes:
        x = x.to(dtype)
    return x.to(final)


def input_batches(input_shape: object, inputs: object, dtypes: Sequence[torch.dtype], work: torch.dtype,
                  device: torch.device, generator: torch.Generator) -> list[tuple[str, Tensor]]:
    """``(label, batch)`` pairs: generated for a per-sample ``input_shape``, else the given ``inputs``."""
    if input_shape is not None and inputs is not None:
        raise FcconvError(
            "compare takes either input_shape (inputs are generated) or inputs (your own batches), "
            f"not both; got input_shape={input_shape!r:.40} and inputs. Drop one of them."
        )
    if input_shape is not None:
        return _generated_batches(_checked_shape(input_shape), dtypes, work, device, generator)
    if inputs is None:
        raise FcconvError(
            "compare needs inputs: pass the reference's per-sample input_shape, e.g. (3, 32, 32), or "
            "inputs=, a batch tensor or a list of batch tensors."
        )
    return _given_batches(inputs)


def _checked_shape(input_shape: object) -> tuple[int, ...]:
    if isinstance(input_shape, Tensor) or (isinstance(input_shape, (list, tuple)) and input_shape
                                           and all(isinstance(t, Tensor) for t in input_shape)):
        raise FcconvError(
            "input_shape is the reference's per-sample input shape, e.g. (3, 32, 32); got tensors. "
            "Pass your own batches as inputs=x (or inputs=[x1, x2])."
        )
    return check_input_shape(input_shape, any_rank=True)


def _generated_batches(shape: tuple[int, ...], dtypes: Sequence[torch.dtype], work: torch.dtype,
                       device: torch.device, generator: torch.Generator) -> list[tuple[str, Tensor]]:
    big = 1e3 if all(torch.finfo(d).max > 1e30 for d in dtypes) else 10.0
    batches = []
    full = (_BATCH_SIZE, *shape)
    for label in _GENERATED:
        if label == "normal":
            x = torch.randn(full, generator=generator, dtype=_F64)
        elif label == "normal x1e3":
            x = torch.randn(full, generator=generator, dtype=_F64) * big
            label = f"normal x{big:g}"
        elif label == "negative":
            x = -torch.randn(full, generator=generator, dtype=_F64).abs()
        else:
            x = torch.rand(full, generator=generator, dtype=_F64)
        batches.append((label, round_through(x, dtypes, work).to(device)))
    return batches


def _given_batches(inputs: object) -> list[tuple[str, Tensor]]:
    if isinstance(inputs, Tensor):
        tensors = [inputs]
    elif isinstance(inputs, (list, tuple)) and inputs and all(isinstance(t, Tensor) for t in inputs):
        tensors = list(inputs)
    else:
        raise FcconvError(
            "inputs must be a batch tensor or a list of batch tensors (batch dimension first); got "
            f"{inputs!r:.80}. For generated inputs pass the per-sample shape as input_shape instead."
        )
    out = []
    for i, t in enumerate(tensors):
        if t.dim() == 0 or t.shape[0] == 0:
            raise FcconvError(
                f"Input batch {i} has shape {tuple(t.shape)}; a batch tensor needs a batch dimension "
                "of at least one sample first. Pass x.unsqueeze(0) for a single sample, or input_shape "
                "to get generated inputs."
            )
        out.append((f"batch {i}", t.detach()))
    return out


def output_maps(output_map: object) -> tuple[Callable[[Any], Any], Callable[[Any], Any]]:
    """The maps applied to the reference's and the candidate's outputs."""
    def identity(y: Any) -> Any:
        return y

    if output_map is None:
        return identity, identity
    if callable(output_map):
        return identity, output_map
    if isinstance(output_map, (tuple, list)) and len(output_map) == 2 and all(
            m is None or callable(m) for m in output_map):
        return (output_map[0] or identity), (output_map[1] or identity)
    raise FcconvError(
        "output_map must be a callable applied to the candidate's output, or a pair (reference_map, "
        f"candidate_map) of callables or None; got {output_map!r:.80}."
    )


def float64_copies(reference: nn.Module, candidate: nn.Module) -> tuple[nn.Module, nn.Module]:
    """Deep copies with float64 parameters and buffers; the originals are never touched.

    Parameters are converted straight into the copy (no working-dtype duplicate), and tensors that
    share storage in the originals (``share_weights=True`` conversions) share it in the copies.
    """
    memo: dict[int, Any] = {}
    converted: dict[tuple[int, int, int, torch.dtype], Tensor] = {}  # storage, offset, numel, dtype
    for module in (reference, candidate):
        for t in list(module.parameters()) + list(module.buffers()):
            if id(t) in memo or not t.is_floating_point():
                continue
            key = (t.untyped_storage().data_ptr(), int(t.storage_offset()), t.numel(), t.dtype)
            if t.is_contiguous() and key in converted:
                data = converted[key].view(t.shape)
            else:
                data = t.detach().to(_F64, copy=True)
                if t.is_contiguous():
                    converted[key] = data
            memo[id(t)] = nn.Parameter(data, requires_grad=False) if isinstance(t, nn.Parameter) else data
    try:
        copies = copy.deepcopy(reference, memo), copy.deepcopy(candidate, memo)
    except Exception as err:
        raise FcconvError(
            f"compare needs deep copies of both modules for its float64 run, and copying failed: {err}. "
            "Modules that hold non-leaf tensors as attributes cannot be deep-copied; register them as "
            "buffers, or compute them in forward."
        ) from err
    return copies[0].double(), copies[1].double()

