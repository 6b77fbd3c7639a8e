"""Tracing a model with torch.fx: chosen leaf modules, failures that name the module, node helpers."""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any

import torch
from torch import fx, nn

from fcconv.errors import NotEquivalentError

__all__ = [
    "KNOWN_LEAVES", "arg", "data_inputs", "describe", "first_tensor_output", "is_known_leaf",
    "leaf_matchers", "trace", "unwrap",
]


def leaf_matchers(model: nn.Module, leaf_modules: object) -> tuple[tuple[type, ...], set[str]]:
    """Split ``leaf_modules`` into module types and qualified names (instances become names)."""
    if isinstance(leaf_modules, (type, nn.Module, str)):
        leaf_modules = (leaf_modules,)
    try:
        items = list(leaf_modules)  # type: ignore[call-overload]
    except TypeError:
        raise NotEquivalentError(
            f"leaf_modules must be a sequence of module types, module instances or qualified names; "
            f"got {leaf_modules!r}. Pass e.g. leaf_modules=[MyBlock] or leaf_modules=['layer1.0']."
        ) from None
    names_of = {id(m): name for name, m in model.named_modules(remove_duplicate=False)}
    types: list[type] = []
    names: set[str] = set()
    for item in items:
        if isinstance(item, type) and issubclass(item, nn.Module):
            types.append(item)
        elif isinstance(item, nn.Module):
            if id(item) not in names_of:
                raise NotEquivalentError(
                    f"leaf_modules holds a {type(item).__name__} that is not a submodule of the "
                    "model. Pass the model's own submodule, its type or its qualified name."
                )
            names.add(names_of[id(item)])
        elif isinstance(item, str):
            names.add(item)
        else:
            raise NotEquivalentError(
                f"leaf_modules must hold module types, module instances or qualified names; got "
                f"{item!r}. Pass e.g. leaf_modules=[MyBlock]."
            )
    return tuple(types), names


class _LeafTracer(fx.Tracer):
    """An fx tracer that keeps chosen modules whole and remembers where tracing failed."""

    # Defaults, because an fx GraphModule unpickles by re-tracing with its tracer class, called
    # without arguments (the re-trace keeps every submodule whole): a converted model must pickle.
    def __init__(self, leaf_types: tuple[type, ...] = (), leaf_names: set[str] | None = None) -> None:
        super().__init__()
        self.leaf_types = leaf_types
        self.leaf_names = leaf_names or set()
        self.stack: list[tuple[str, nn.Module]] = []
        self.failed_in: tuple[str, nn.Module] | None = None

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        # nn.Linear subclasses (timm.layers.Linear) stay Linear modules: their forward would
        # trace down to F.linear and hide what they compute.
        return (
            isinstance(m, (nn.Linear, *self.leaf_types))
            or module_qualified_name in self.leaf_names
            or super().is_leaf_module(m, module_qualified_name)
        )

    def call_module(self, m: nn.Module, forward: Callable[..., Any], args: tuple[Any, ...],
                    kwargs: dict[str, Any]) -> Any:
        name = self.path_of_module(m)
        self.stack.append((name, m))
        try:
            return super().call_module(m, forward, args, kwargs)
        except Exception:
            if self.failed_in is None:
                self.failed_in = (name, m)
            raise
        finally:
            self.stack.pop()


def unwrap(model: nn.Module) -> nn.Module:
    """The module a ``torch.compile`` wrapper holds; refuse TorchScript modules with a fitting message."""
    inner = getattr(model, "_orig_mod", None)
    if isinstance(inner, nn.Module) and type(model).__name__ == "OptimizedModule":
        return inner
    if isinstance(model, torch.jit.ScriptModule):
        raise NotEquivalentError(
            f"Cannot convolutionalize a TorchScript module ({type(model).__name__}): it holds "
            "TorchScript code, not the Python forward that torch.fx traces. Convert the original "
            "nn.Module (before torch.jit.script or torch.jit.trace), then script the result."
        )
    return model


def _trace_once(model: nn.Module, types: tuple[type, ...], names: set[str]
                ) -> tuple[fx.Graph | None, _LeafTracer, Exception | None]:
    tracer = _LeafTracer(types, names)
    try:
        return tracer.trace(model), tracer, None
    except Exception as error:  # TraceError, TypeError, RuntimeError...: all tracing failures
        return None, tracer, error


def trace(model: nn.Module, leaf_modules: object = (), *, auto_leaf: bool = True) -> fx.GraphModule:
    """Symbolically trace ``model``; modules in ``leaf_modules`` stay single graph nodes.

    A ``torch.compile``d model is traced through its ``_orig_mod``. With ``auto_leaf``, a submodule
    whose forward cannot be traced and whose type is a known leaf (:data:`KNOWN_LEAVES` and timm's
    own registry: ``Conv2dSame``, ``ConvMlp``...) is kept whole and tracing is tried again.

    Raises:
        NotEquivalentError: if tracing fails (data-dependent control flow, unsupported Python on
            proxies...); the message names the module being traced and suggests ``leaf_modules``.
    """
    model = unwrap(model)
    types, names = leaf_matchers(model, leaf_modules)
    auto: list[type] = []
    graph, tracer, error = _trace_once(model, types, names)
    while graph is None and auto_leaf and tracer.failed_in is not None:
        failed_type = type(tracer.failed_in[1])
        if failed_type in auto or not is_known_leaf(failed_type):
            break
        auto.append(failed_type)
        graph, tracer, error = _trace_once(model, (*types, *auto), names)
    if graph is None:
        raise _trace_error(model, tracer, error, auto) from None
    return fx.GraphModule(tracer.root, graph, model.__class__.__name__)


# Modules known to trace badly but to work at any input size, by qualified class name, besides
# those timm registers itself (``timm.layers.register_notrace_module``: Conv2dSame, MaxPool2dSame...).
KNOWN_LEAVES = {
    "timm.layers.mlp.ConvMlp",  # VGG's pre-logits: `if x.shape[-2] < kernel: pool first`
}


def is_known_leaf(module_type: type) -> bool:
    """A module type that may be kept whole when tracing through it fails."""
    qualname = f"{module_type.__module__}.{module_type.__qualname__}"
    if qualname in KNOWN_LEAVES:
        return True
    timm_fx = sys.modules.get("timm.layers._fx")  # never import timm: only models built with it
    registered = getattr(timm_fx, "_leaf_modules", ()) if timm_fx is not None else ()
    return module_type in registered


def _trace_error(model: nn.Module, tracer: _LeafTracer, error: Exception | None,
                 auto: list[type]) -> NotEquivalentError:
    where = "in the model's own forward"
    advice = (
        "make that forward free of data-dependent control flow, or wrap the offending code "
        "in a submodule and pass it in leaf_modules"
    )
    if tracer.failed_in is not None and tracer.failed_in[0]:
        qualname, module = tracer.failed_in
        where = f"inside module '{qualname}' ({type(module).__name__})"
        advice = (
            f"pass leaf_modules=[{type(module).__name__}] (or leaf_modules=['{qualname}']) so "
            "that it is called as one opaque module, which must then work on larger inputs "
            "itself, or make its forward free of data-dependent control flow"
        )
    kept = (f" (kept whole automatically: {', '.join(t.__name__ for t in auto)})" if auto else "")
    return NotEquivalentError(
        f"Cannot trace {type(model).__name__} with torch.fx {where}{kept}: "
        f"{type(error).__name__}: {error}. To convolutionalize it, {advice}."
    )


def arg(node: fx.Node, index: int, name: str, default: Any = None) -> Any:
    """Argument ``name`` of a call, given by keyword or at position ``index``."""
    if name in node.kwargs:
        return node.kwargs[name]
    if index < len(node.args):
        return node.args[index]
    return default


def data_inputs(node: fx.Node) -> list[fx.Node]:
    """The nodes a node reads, in order, without duplicates (nested in lists and dicts too)."""
    return list(dict.fromkeys(node.all_input_nodes))


def describe(node: fx.Node, gm: fx.GraphModule) -> str:
    """``node 'fc' (Linear(in_features=512, out_features=10, bias=True))`` for messages."""
    if node.op == "call_module":
        return f"node '{node.name}' (module '{node.target}': {gm.get_submodule(str(node.target))})"
    if node.op == "call_function":
        fn = node.target
        fname = getattr(fn, "__name__", str(fn))
        module = getattr(fn, "__module__", None)
        if fname == "fn" and "boolean_dispatch" in getattr(fn, "__qualname__", ""):
            fname = "pooling function"
        qual = f"{module}.{fname}" if module and module != "_operator" else f"operator.{fname}"
        return f"node '{node.name}' (call to {qual})"
    if node.op == "call_method":
        return f"node '{node.name}' (method Tensor.{node.target})"
    return f"node '{node.name}' ({node.op} {node.target})"


def first_tensor_output(gm: fx.GraphModule) -> fx.Node | None:
    """The node returned by the graph, or the first node of a returned tuple, list or dict."""
    output = next(n for n in reversed(gm.graph.nodes) if n.op == "output")
    value = output.args[0]
    while isinstance(value, (tuple, list, dict)) and value:
        value = next(iter(value.values())) if isinstance(value, dict) else value[0]
    return value if isinstance(value, fx.Node) else None
