"""How the command line finds a model: one set of rules for every command.

A MODEL argument is, in this order:

1. an existing file: a weights-only checkpoint (``torch.load(weights_only=True)``, or
   ``.safetensors``) holding a state dict, which fills the model built by ``--factory``; or a file
   written by ``fcconv convert``, which knows how to rebuild its own structure;
2. ``torchvision:NAME``: a torchvision model with random weights (``weights=None``; nothing is
   downloaded);
3. ``timm:NAME``: a timm model with random weights (``pretrained=False``; nothing is downloaded);
4. a layer spec such as ``Conv2d(16, 32, 3, stride=2)`` (see :mod:`fcconv.cli._spec`);
5. ``package.module:factory``: a callable (called with ``--kwargs``, if any) or an ``nn.Module``
   attribute; the current folder is searched first, as ``python -m`` does.

Every model comes back in eval mode, on the CPU. Random weights are drawn from ``seed`` and the global
random state is left as it was.
"""

from __future__ import annotations

import difflib
import importlib
import os
import pickle
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from fcconv.cli._app import one_line
from fcconv.cli._spec import build_layer, is_layer_spec, parse_kwargs, seeded
from fcconv.errors import FcconvError

__all__ = [
    "CONVERT_FORMAT",
    "LoadedModel",
    "as_fcn_source",
    "import_attribute",
    "build_model",
    "fill",
    "load_checkpoint",
    "load_model",
]

#: The key that marks a file written by ``fcconv convert``; its value is the format version.
CONVERT_FORMAT = "fcconv_format"
_CHECKPOINT_SUFFIXES = (".pt", ".pth", ".ckpt", ".bin", ".safetensors")
_STATE_DICT_KEYS = ("state_dict", "model_state_dict", "model")
_MODEL_FORMS = (
    "torchvision:NAME (e.g. torchvision:resnet18), timm:NAME (e.g. timm:resnet18), package.module:factory, "
    "a layer spec such as 'Linear(25088, 4096)', or a checkpoint file with --factory"
)


@dataclass
class LoadedModel:
    """A model the command line loaded, and how to build its structure again.

    Attributes:
        module: the model, in eval mode.
        source: the MODEL argument as given.
        structure: the reference that builds the (untrained) structure: a torchvision or timm name, an import
            path or a layer spec; for a checkpoint, its ``--factory``.
        kwargs: the ``--kwargs`` text given to the factory.
        saved: for a file written by ``fcconv convert``, its metadata (everything but the weights).
    """

    module: nn.Module
    source: str
    structure: str
    kwargs: str = ""
    saved: dict[str, Any] = field(default_factory=dict)


def _torchvision_model(name: str, kwargs: dict[str, Any]) -> nn.Module:
    try:
        from torchvision import models
    except ImportError:
        raise FcconvError(
            f"torchvision:{name} needs torchvision, which is not installed. "
            "Install it with pip install 'fcconv[models]'."
        ) from None
    names = models.list_models()
    if name not in names:
        close = difflib.get_close_matches(name, names, n=3)
        hint = f"Did you mean {', '.join('torchvision:' + c for c in close)}? " if close else ""
        raise FcconvError(
            f"Unknown torchvision model {name!r}. {hint}"
            "See torchvision.models.list_models() for the names."
        )
    try:
        return models.get_model(name, weights=None, **kwargs)
    except TypeError as error:
        raise FcconvError(
            f"torchvision:{name} does not take --kwargs {kwargs}: {error}."
        ) from None


def _timm_model(name: str, kwargs: dict[str, Any]) -> nn.Module:
    try:
        import timm
    except ImportError:
        raise FcconvError(
            f"timm:{name} needs timm, which is not installed. Install it with pip install 'fcconv[models]'."
        ) from None
    if not timm.is_model(name):  # also refuses hf-hub: and local-dir: names, which read files
        close = difflib.get_close_matches(name, timm.list_models(), n=3)
        hint = f"Did you mean {', '.join('timm:' + c for c in close)}? " if close else ""
        raise FcconvError(f"Unknown timm model {name!r}. {hint}See timm.list_models() for the names.")
    try:
        return timm.create_model(name, pretrained=False, **kwargs)
    except TypeError as error:
        raise FcconvError(f"timm:{name} does not take --kwargs {kwargs}: {error}.") from None
    except Exception as error:  # noqa: BLE001 - timm failed to build it (e.g. an unknown tag)
        raise FcconvError(
            f"timm could not build {name!r}: {type(error).__name__}: {one_line(error)}"
        ) from None


def import_attribute(reference: str) -> Any:
    module_name, _, attribute = reference.partition(":")
    if not module_name or not attribute or not all(
        part.isidentifier() for part in (*module_name.split("."), *attribute.split("."))
    ):
        raise FcconvError(
            f"Cannot read the model {reference!r}: expected {_MODEL_FORMS}."
        )
    cwd = os.getcwd()
    added = cwd not in sys.path
    if added:
        sys.path.insert(0, cwd)
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as error:
        if error.name and module_name.startswith(error.name):
            raise FcconvError(
                f"Cannot import {module_name!r} (from {reference!r}): no module named {error.name!r}. "
                "Check the spelling, run from the folder that holds it, or install it."
            ) from None
        raise FcconvError(
            f"Importing {module_name!r} failed: it needs the module {error.name!r}, which is not installed."
        ) from None
    except Exception as error:  # noqa: BLE001 - the user's module failed while importing
        raise FcconvError(
            f"Importing {module_name!r} failed: {type(error).__name__}: {error}"
        ) from None
    finally:
        if added and cwd in sys.path:
            sys.path.remove(cwd)
    value: Any = module
    for part in attribute.split("."):
        if not hasattr(value, part):
            public = sorted(n for n in dir(module) if not n.startswith("_") and callable(getattr(module, n)))
            raise FcconvError(
                f"Module {module_name!r} has no attribute {attribute!r}. "
                f"Its callables are: {', '.join(public[:12]) or 'none'}."
            )
        value = getattr(value, part)
    return value


def _from_import_path(reference: str, kwargs: dict[str, Any]) -> nn.Module:
    value = import_attribute(reference)
    if isinstance(value, nn.Module):
        if kwargs:
            raise FcconvError(f"{reference} is a module, not a factory; it takes no --kwargs.")
        return value
    if not callable(value):
        raise FcconvError(
            f"{reference} is a {type(value).__name__}, expected a factory (a function or class that "
            "returns an nn.Module) or an nn.Module."
        )
    call = f"{reference}({', '.join(f'{k}={v!r}' for k, v in kwargs.items())})"
    try:
        model = value(**kwargs)
    except TypeError as error:
        raise FcconvError(
            f"Calling {call} failed: {error}. Pass its arguments with --kwargs 'name=value, ...'."
        ) from None
    except Exception as error:  # noqa: BLE001 - the user's factory failed
        raise FcconvError(f"Calling {call} failed: {type(error).__name__}: {error}") from None
    if not isinstance(model, nn.Module):
        raise FcconvError(
            f"{reference}() returned a {type(model).__name__}, expected an nn.Module."
        )
    return model


def build_model(reference: str, *, kwargs: str = "", seed: int = 0) -> nn.Module:
    """Build the model ``reference`` names, with random weights from ``seed``, in eval mode.

    Args:
        reference: ``torchvision:NAME``, ``timm:NAME``, ``package.module:factory`` or a layer spec.
        kwargs: keyword arguments for the factory, as text: ``"num_classes=10"``.
        seed: seed of the weight initialisation.

    Raises:
        FcconvError: on an unknown name, a failed import or call, or a bad spec.

    Example:
        >>> build_model("Linear(4, 2)")
        Linear(in_features=4, out_features=2, bias=True)
    """
    reference = reference.strip()
    options = parse_kwargs(kwargs)
    if reference.startswith("torchvision:"):
        name = reference.partition(":")[2]
        model = seeded(lambda: _torchvision_model(name, options), seed)
    elif reference.startswith("timm:"):
        name = reference.partition(":")[2]
        model = seeded(lambda: _timm_model(name, options), seed)
    elif is_layer_spec(reference):
        if options:
            raise FcconvError(f"A layer spec takes no --kwargs; write them in the spec: {reference!r}.")
        model = build_layer(reference, seed=seed)
    elif ":" in reference:
        model = seeded(lambda: _from_import_path(reference, options), seed)
    else:
        raise _unknown_model(reference)
    return model.eval()


def _unknown_model(reference: str) -> FcconvError:
    hint = ""
    try:
        from torchvision import models

        if reference in models.list_models():
            hint = f" Did you mean torchvision:{reference}?"
    except ImportError:
        pass
    try:
        import timm

        if not hint and timm.is_model(reference):
            hint = f" Did you mean timm:{reference}?"
    except ImportError:
        pass
    if reference.lower().endswith(_CHECKPOINT_SUFFIXES) or os.sep in reference:
        return FcconvError(f"Checkpoint file {reference!r} not found. Check the path.{hint}")
    return FcconvError(f"Unknown model {reference!r}: expected {_MODEL_FORMS}.{hint}")


def load_checkpoint(path: Path) -> Any:
    """The content of a weights-only checkpoint, loaded on the CPU without running any code.

    Raises:
        FcconvError: if the file cannot be read, is corrupt, or holds pickled Python objects.
    """
    try:
        if path.suffix == ".safetensors":
            try:
                from safetensors.torch import load_file
            except ImportError:
                raise FcconvError(
                    f"Reading {str(path)!r} needs safetensors: pip install safetensors."
                ) from None
            return load_file(str(path), device="cpu")
        return torch.load(path, map_location="cpu", weights_only=True)
    except FcconvError:
        raise
    except pickle.UnpicklingError as error:
        if "Unsupported global" in str(error):
            raise FcconvError(
                f"{str(path)!r} is not a weights-only checkpoint: it holds pickled Python objects, which "
                "fcconv never unpickles. Save the weights with torch.save(model.state_dict(), path)."
            ) from None
        raise _corrupt(path, error) from None
    except OSError:
        raise
    except Exception as error:  # noqa: BLE001 - zip, EOF, header errors: all "corrupt"
        raise _corrupt(path, error) from None


def _corrupt(path: Path, error: BaseException) -> FcconvError:
    detail = str(error).split(".")[0].strip() or type(error).__name__
    return FcconvError(
        f"Cannot read {str(path)!r}: not a PyTorch checkpoint, or a corrupt one ({detail}). "
        "Save it again with torch.save(model.state_dict(), path)."
    )


def _state_dict(content: Any, path: Path) -> dict[str, Tensor]:
    """The state dict inside a checkpoint's content: itself, or under a usual key."""
    if isinstance(content, Mapping):
        for key in _STATE_DICT_KEYS:
            inner = content.get(key)
            if isinstance(inner, Mapping) and inner and all(isinstance(v, Tensor) for v in inner.values()):
                return dict(inner)
        if content and all(isinstance(k, str) and isinstance(v, Tensor) for k, v in content.items()):
            return dict(content)
    raise FcconvError(
        f"{str(path)!r} holds a {type(content).__name__} but no state dict (a dict of tensors, possibly "
        f"under one of the keys {', '.join(_STATE_DICT_KEYS)}). Save model.state_dict()."
    )


def fill(model: nn.Module, state_dict: Mapping[str, Tensor], *, what: str, into: str,
         assign: bool = False) -> nn.Module:
    """Load ``state_dict`` into ``model`` strictly, with a one-line message when they do not fit.

    Raises:
        FcconvError: on missing or unexpected keys, or a tensor of the wrong shape.
    """
    expected = model.state_dict()
    missing = [k for k in expected if k not in state_dict]
    unexpected = [k for k in state_dict if k not in expected]
    mismatched = [k for k in expected if k in state_dict and expected[k].shape != state_dict[k].shape]
    if missing or unexpected or mismatched:
        problems = []
        if missing:
            problems.append(f"{len(missing)} missing keys (e.g. {missing[0]!r})")
        if unexpected:
            problems.append(f"{len(unexpected)} unexpected keys (e.g. {unexpected[0]!r})")
        if mismatched:
            key = mismatched[0]
            problems.append(
                f"{len(mismatched)} tensors of the wrong shape (e.g. {key!r}: "
                f"{tuple(state_dict[key].shape)} in the file, {tuple(expected[key].shape)} in the model)"
            )
        raise FcconvError(
            f"The weights of {what} do not fit the model from {into}: {'; '.join(problems)}. "
            "Pass the factory that built the model they were saved from."
        )
    model.load_state_dict(state_dict, assign=assign)
    return model


def as_fcn_source(model: nn.Module) -> nn.Module:
    """The model ``convolutionalize`` receives: a bare Linear acts on the flattened input.

    A single ``nn.Linear`` given for an input ``(C, H, W)`` stands for ``Linear(flatten(x))``, so it is
    wrapped as ``Sequential(Flatten(), linear)``; any other model is returned as is.
    """
    if type(model) is nn.Linear:
        return nn.Sequential(nn.Flatten(), model).eval()
    return model


def _rebuild_saved(content: Mapping[str, Any], path: Path, factory: str | None, kwargs: str) -> LoadedModel:
    """The module saved by ``fcconv convert``, its structure rebuilt from the file's metadata."""
    saved = {k: v for k, v in content.items() if k != "state_dict"}
    state = _state_dict(content, path)
    target = saved.get("to")
    if target in ("linear", "pointwise"):
        spec = str(saved.get("module", ""))
        layer = fill(build_layer(spec, empty=True), state, what=repr(str(path)), into=spec, assign=True)
        return LoadedModel(layer.eval(), str(path), spec, saved=saved)
    if target == "fcn":
        from fcconv.models import FullyConvolutional

        structure = factory or saved.get("structure")
        if not structure:
            raise FcconvError(
                f"{str(path)!r} records no model to rebuild the fully convolutional one from; pass "
                "--factory with the factory of the source model."
            )
        if factory is None:
            kwargs = str(saved.get("kwargs", ""))
        geometry = {"input_shape": saved.get("input_shape"),
                    "head_impl": saved.get("head_impl", saved.get("head", "auto")),
                    **dict(saved.get("geometry") or {})}
        source = as_fcn_source(build_model(str(structure), kwargs=kwargs))
        try:
            fcn = FullyConvolutional.from_state_dict(source, state, geometry)
        except RuntimeError as error:  # load_state_dict: missing, unexpected or misshapen tensors
            raise FcconvError(
                f"The weights of {str(path)!r} do not fit the model {structure} converts to: "
                f"{one_line(error)[:400]}. Pass the --factory the file was converted from."
            ) from None
        return LoadedModel(fcn.eval(), str(path), str(structure), kwargs, saved=saved)
    raise FcconvError(
        f"{str(path)!r} was written by fcconv convert --to {target!r}, which this version cannot read. "
        "Convert the source model again."
    )


def load_model(reference: str, *, factory: str | None = None, kwargs: str = "", seed: int = 0) -> LoadedModel:
    """Load the model a MODEL argument names, by the rules in this module's docstring.

    Args:
        reference: the MODEL argument.
        factory: for a checkpoint, the reference that builds the model its weights fill; for a file
            written by ``fcconv convert --to fcn``, overrides the factory it recorded.
        kwargs: keyword arguments for the factory, as text: ``"num_classes=10"``.
        seed: seed of random weights (for models built without a checkpoint).

    Returns:
        a :class:`LoadedModel`, its module in eval mode.

    Raises:
        FcconvError: with a one-line message for every way this can fail.

    Example:
        >>> load_model("torchvision:squeezenet1_1").structure
        'torchvision:squeezenet1_1'
    """
    reference = reference.strip()
    path = Path(reference).expanduser()
    if path.is_file():
        content = load_checkpoint(path)
        if isinstance(content, Mapping) and CONVERT_FORMAT in content:
            return _rebuild_saved(content, path, factory, kwargs)
        state = _state_dict(content, path)
        if not factory:
            raise FcconvError(
                f"{reference!r} holds weights only ({len(state)} tensors); pass --factory "
                "package.module:factory or --factory torchvision:NAME to build the model they fill."
            )
        model = build_model(factory, kwargs=kwargs, seed=seed)
        fill(model, state, what=repr(reference), into=factory)
        return LoadedModel(model, reference, factory, kwargs)
    if path.is_dir():
        raise FcconvError(f"{reference!r} is a folder; give a checkpoint file or {_MODEL_FORMS}.")
    if reference.lower().endswith(_CHECKPOINT_SUFFIXES) and not is_layer_spec(reference):
        raise _unknown_model(reference)
    return LoadedModel(build_model(reference, kwargs=kwargs, seed=seed), reference, reference, kwargs)
