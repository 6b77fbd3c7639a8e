"""Tracing a model with torch.fx: chosen leaf modules, failures that name the module, node helpers."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from torch import fx, nn

from fcconv.errors import NotEquivalentError

__all__ = ["arg", "data_inputs", "describe", "first_tensor_output", "leaf_matchers", "trace"]


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

    def __init__(self, leaf_types: tuple[type, ...], leaf_names: set[str]) -> None:
        super().__init__()
        self.leaf_types = leaf_types
        self.leaf_names = leaf_names
        self.stack: list[tuple[str, nn.Module]] = []
        self.failed_in: tuple[str, nn.Module] | None = None

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return (
            isinstance(m, self.leaf_types)
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


def trace(model: nn.Module, leaf_modules: object = ()) -> fx.GraphModule:
    """Symbolically trace ``model``; modules in ``leaf_modules`` stay single graph nodes.

    Raises:
        NotEquivalentError: if tracing fails (data-dependent control flow, unsupported Python on
            proxies...); the message names the module being traced and suggests ``leaf_modules``.
    """
    types, names = leaf_matchers(model, leaf_modules)
    tracer = _LeafTracer(types, names)
    try:
        graph = tracer.trace(model)
    except Exception as error:  # TraceError, TypeError, RuntimeError...: all tracing failures
        where = "in the model's own forward"
        advice = (
            "make that forward free of data-dependent control flow, or wrap the offending code "
            "in a submodule and pass it in leaf_modules"
        )
        if tracer.failed_in is not None:
            qualname, module = tracer.failed_in
            where = f"inside module '{qualname}' ({type(module).__name__})"
            advice = (
                f"pass leaf_modules=[{type(module).__name__}] (or leaf_modules=['{qualname}']) so "
                "that it is called as one opaque module, which must then work on larger inputs "
                "itself, or make its forward free of data-dependent control flow"
            )
        raise NotEquivalentError(
            f"Cannot trace {type(model).__name__} with torch.fx {where}: "
            f"{type(error).__name__}: {error}. To convolutionalize it, {advice}."
        ) from None
    name = model.__class__.__name__
    return fx.GraphModule(tracer.root, graph, name)


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
