"""Layer specs such as ``Conv2d(16, 32, 3, stride=2, padding=1, bias=False)``, parsed safely.

The text is parsed with :func:`ast.parse` and walked with a whitelist: one call of a known layer
class (``Linear``, ``Conv1d/2d/3d``, ``ConvTranspose1d/2d/3d``, optionally written ``nn.Conv2d`` or
``torch.nn.Conv2d``) whose arguments are literals: numbers, strings, booleans, ``None`` and tuples
of them. Nothing is ever evaluated, so ``__import__('os').system('...')`` is refused, not run.

Example:
    >>> build_layer("Conv2d(4, 2, kernel_size=1)")
    Conv2d(4, 2, kernel_size=(1, 1), stride=(1, 1))
"""

from __future__ import annotations

import ast
import inspect
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import torch
from torch import nn
from torch.nn.modules.conv import _ConvNd, _ConvTransposeNd

from fcconv.errors import FcconvError

__all__ = ["LAYERS", "LayerSpec", "build_layer", "is_layer_spec", "layer_spec", "parse_kwargs",
           "parse_layer_spec", "seeded"]

T = TypeVar("T")

LAYERS: dict[str, type[nn.Module]] = {
    cls.__name__: cls
    for cls in (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d,
                nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)
}
_PREFIXES = ("", "nn.", "torch.nn.")
_REFUSED_KWARGS = ("device", "dtype")
_MAX_TEXT = 1000
# A layer spec builds real, initialised weights: refuse what would not fit in memory (1 GiB float32).
MAX_PARAMETERS = 2**28
_EXAMPLE = "Conv2d(16, 32, 3, stride=2, padding=1, bias=False) or Linear(25088, 4096)"


@dataclass(frozen=True)
class LayerSpec:
    """A parsed spec: the layer class name and its literal arguments."""

    name: str
    args: tuple[Any, ...]
    kwargs: dict[str, Any]

    @property
    def layer_class(self) -> type[nn.Module]:
        return LAYERS[self.name]


def is_layer_spec(text: str) -> bool:
    """Whether ``text`` looks like a layer spec (a name followed by parentheses), not a model path."""
    head, paren, _ = text.strip().partition("(")
    return bool(paren) and head.strip().replace(".", "").isidentifier()


def _spec_error(text: str, problem: str) -> FcconvError:
    return FcconvError(
        f"Cannot read the layer spec {text!r}: {problem}. Write one layer with literal arguments, "
        f"e.g. {_EXAMPLE}; known layers: {', '.join(LAYERS)}."
    )


def _dotted_name(node: ast.expr) -> str | None:
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        base = _dotted_name(node.value)
        return None if base is None else f"{base}.{node.attr}"
    return None


def _literal(node: ast.expr, text: str) -> Any:
    """The value of a literal node: number, string, bool, None, or a tuple/list of literals."""
    if isinstance(node, ast.Constant) and (node.value is None or isinstance(node.value, (int, float, str))):
        return node.value
    if isinstance(node, (ast.Tuple, ast.List)):
        return tuple(_literal(item, text) for item in node.elts)
    if (isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.USub, ast.UAdd))
            and isinstance(node.operand, ast.Constant) and isinstance(node.operand.value, (int, float))
            and not isinstance(node.operand.value, bool)):
        value = node.operand.value
        return -value if isinstance(node.op, ast.USub) else value
    raise _spec_error(text, f"{ast.unparse(node)!r} is not a literal (only numbers, strings, True/False, "
                            "None and tuples are allowed)")


def _parse_call(text: str) -> tuple[str, tuple[Any, ...], dict[str, Any]]:
    if len(text) > _MAX_TEXT:
        raise _spec_error(text[:40] + "...", f"it is {len(text)} characters long, the limit is {_MAX_TEXT}")
    try:
        tree = ast.parse(text.strip(), mode="eval")
    except (SyntaxError, ValueError, RecursionError, MemoryError) as error:
        reason = getattr(error, "msg", None) or type(error).__name__
        raise _spec_error(text, f"it is not valid syntax ({reason})") from None
    call = tree.body
    if not isinstance(call, ast.Call):
        raise _spec_error(text, "expected a single call such as Linear(4, 2)")
    name = _dotted_name(call.func)
    if name is None:
        raise _spec_error(text, f"{ast.unparse(call.func)!r} is not a plain name")
    if any(isinstance(a, ast.Starred) for a in call.args) or any(k.arg is None for k in call.keywords):
        raise _spec_error(text, "* and ** arguments are not allowed")
    args = tuple(_literal(a, text) for a in call.args)
    kwargs = {k.arg: _literal(k.value, text) for k in call.keywords if k.arg is not None}
    return name, args, kwargs


def parse_layer_spec(text: str) -> LayerSpec:
    """Parse ``text`` into a :class:`LayerSpec`, without evaluating anything.

    Args:
        text: e.g. ``"Conv2d(16, 32, 3, stride=2, padding=1, bias=False)"``.

    Raises:
        FcconvError: on anything but one call of a known layer with literal arguments.

    Example:
        >>> parse_layer_spec("Linear(4, 2, bias=False)")
        LayerSpec(name='Linear', args=(4, 2), kwargs={'bias': False})
    """
    name, args, kwargs = _parse_call(text)
    short = next((name[len(p):] for p in _PREFIXES[1:] if name.startswith(p)), name)
    if short not in LAYERS:
        raise _spec_error(text, f"{name!r} is not a layer fcconv builds from a spec")
    spec = LayerSpec(short, args, kwargs)
    try:
        bound = inspect.signature(spec.layer_class).bind(*args, **kwargs)
    except TypeError as error:
        raise _spec_error(text, f"{short} does not take these arguments ({error})") from None
    refused = [k for k in bound.arguments if k in _REFUSED_KWARGS]
    if refused:
        raise _spec_error(text, f"{refused[0]} is not accepted here (layers are built in float32 on the CPU)")
    return spec


def build_layer(spec: str | LayerSpec, *, seed: int = 0, empty: bool = False) -> nn.Module:
    """Build the layer a spec describes, its weights initialised from ``seed``, in eval mode.

    The global random state is left as it was.

    Args:
        spec: a spec string or a parsed :class:`LayerSpec`.
        seed: seed of the weight initialisation.
        empty: build it on the ``meta`` device, without memory or weights (to be filled with
            ``load_state_dict(..., assign=True)``); there is no size limit then.

    Raises:
        FcconvError: on a bad spec, arguments the layer refuses, or more than 2**28 parameters.

    Example:
        >>> build_layer("Linear(4, 2)").weight.shape
        torch.Size([2, 4])
    """
    text = spec if isinstance(spec, str) else layer_spec_text(spec)
    parsed = parse_layer_spec(spec) if isinstance(spec, str) else spec
    cls = parsed.layer_class
    try:
        meta = cls(*parsed.args, **parsed.kwargs, device="meta")
    except Exception as error:  # noqa: BLE001 - torch's own argument checks, as one message
        problem = " ".join(str(error).split())
        raise _spec_error(text, f"{parsed.name} refuses these arguments: {problem}") from None
    if empty:
        return meta.eval()
    count = sum(math.prod(p.shape) for p in meta.parameters())
    if count > MAX_PARAMETERS:
        raise FcconvError(
            f"The layer spec {text!r} has {count:,} parameters; the limit is {MAX_PARAMETERS:,} "
            "(1 GiB in float32). Use smaller sizes."
        )
    return seeded(lambda: cls(*parsed.args, **parsed.kwargs), seed).eval()


def seeded(build: Callable[[], T], seed: int) -> T:
    """``build()`` with the CPU random state seeded, the global random state left as it was."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return build()


def layer_spec_text(spec: LayerSpec) -> str:
    """The text of a parsed spec, ``Name(arg, ..., key=value)``."""
    parts = [repr(a) for a in spec.args] + [f"{k}={v!r}" for k, v in spec.kwargs.items()]
    return f"{spec.name}({', '.join(parts)})"


def layer_spec(module: nn.Module) -> str:
    """The spec that rebuilds ``module``'s structure (not its weights): the inverse of :func:`build_layer`.

    Raises:
        FcconvError: if ``module`` is not one of the layers specs describe.

    Example:
        >>> layer_spec(nn.Linear(4, 2))
        'Linear(4, 2, bias=True)'
    """
    name = type(module).__name__
    if isinstance(module, nn.Linear) and name == "Linear":
        return f"Linear({module.in_features}, {module.out_features}, bias={module.bias is not None})"
    if isinstance(module, _ConvNd) and name in LAYERS:
        kwargs: dict[str, Any] = {
            "kernel_size": tuple(module.kernel_size), "stride": tuple(module.stride),
            "padding": module.padding if isinstance(module.padding, str) else tuple(module.padding),
        }
        if isinstance(module, _ConvTransposeNd):
            kwargs["output_padding"] = tuple(module.output_padding)
        kwargs.update(groups=module.groups, bias=module.bias is not None, dilation=tuple(module.dilation),
                      padding_mode=module.padding_mode)
        return layer_spec_text(LayerSpec(name, (module.in_channels, module.out_channels), kwargs))
    raise FcconvError(
        f"Cannot describe a {name} as a layer spec; only {', '.join(LAYERS)} have one."
    )


def parse_kwargs(text: str) -> dict[str, Any]:
    """Keyword arguments such as ``"num_classes=10, aux_logits=False"``, parsed like a spec.

    Raises:
        FcconvError: on anything but ``name=literal`` pairs.

    Example:
        >>> parse_kwargs("num_classes=10, dropout=0.2")
        {'num_classes': 10, 'dropout': 0.2}
    """
    if not text.strip():
        return {}
    try:
        name, args, kwargs = _parse_call(f"f({text})")
    except FcconvError:
        args, kwargs = (None,), {}
    if args:
        raise FcconvError(
            f"Cannot read --kwargs {text!r}: expected name=value pairs with literal values, e.g. "
            "'num_classes=10, dropout=0.2'."
        )
    return kwargs
