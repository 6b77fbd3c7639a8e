"""The state of one head rewrite: what each head tensor holds (:class:`Layout`) and the pass."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from torch import fx, nn

from fcconv.errors import NotEquivalentError
from fcconv.models.shapes import NodeValue
from fcconv.models.tracing import describe

__all__ = ["TODO_HEAD", "Layout", "Pass"]


@dataclass(frozen=True)
class Layout:
    """What a head tensor holds; in the converted graph it is a map ``(N, channels, *grid)``.

    ``kind``: "channels" (a flat ``(N, F)`` of features at training size), "window" (a flat
    ``(N, C*h*w)`` that flattens a ``(C, *spatial)`` map) or "map" (a ``(N, C, *spatial)`` map of
    fixed training size, dims possibly permuted: ``order[i]`` is the canonical dim at position i).
    """

    kind: str
    channels: int
    spatial: tuple[int, ...]
    order: tuple[int, ...] = ()

    @property
    def point(self) -> bool:
        return all(s == 1 for s in self.spatial)

    @property
    def channel_position(self) -> int:
        return self.order.index(1) if self.order else 1


@dataclass
class Pass:
    """State of one conversion."""

    gm: fx.GraphModule
    source: nn.Module
    inplace: bool
    ndim: int
    head_impl: str
    shapes: dict[fx.Node, NodeValue]
    # per node, how its dims depend on the input size (from spatial_descriptors)
    descs: dict[fx.Node, Any] = field(default_factory=dict)
    layouts: dict[fx.Node, Layout] = field(default_factory=dict)
    converted: dict[str, tuple[Any, nn.Module]] = field(default_factory=dict)
    # Nodes to drop, and what replaces them; applied at the end so that layouts stay keyed by
    # the original nodes while the head is walked.
    replaced: dict[fx.Node, fx.Node] = field(default_factory=dict)

    # -- helpers ---------------------------------------------------------------------------
    def shape(self, node: fx.Node) -> tuple[int, ...]:
        s = self.shapes.get(node)
        assert isinstance(s, tuple)
        return s

    def module(self, node: fx.Node) -> nn.Module:
        return self.gm.get_submodule(str(node.target))

    def fail(self, node: fx.Node, why: str, todo: str) -> NotEquivalentError:
        return NotEquivalentError(f"Cannot convolutionalize {describe(node, self.gm)}: {why}. {todo}.")

    def set_module(self, target: str, module: nn.Module, key: Any) -> None:
        """Put ``module`` at ``target`` (and on the source model when converting in place)."""
        previous = self.converted.get(target)
        if previous is not None:
            if previous[0] != key:
                raise NotEquivalentError(
                    f"Module '{target}' is called twice in the head with different inputs "
                    f"({previous[0]} and {key}); it cannot become one conv. Give each call its "
                    "own module."
                )
            return
        self.converted[target] = (key, module)
        roots = [self.gm, self.source] if self.inplace else [self.gm]
        for root in roots:
            parent_name, _, name = target.rpartition(".")
            try:
                parent = root.get_submodule(parent_name) if parent_name else root
            except AttributeError:
                continue
            setattr(parent, name, module)

    def new_module(self, base: str, module: nn.Module) -> str:
        name, i = base, 0
        while hasattr(self.gm, name):
            i += 1
            name = f"{base}_{i}"
        self.gm.add_submodule(name, module)
        return name

    def remove(self, node: fx.Node, replacement: fx.Node) -> None:
        self.replaced[node] = replacement

    def apply_removals(self) -> None:
        for node in list(self.gm.graph.nodes):
            if node not in self.replaced:
                continue
            replacement = self.replaced[node]
            while replacement in self.replaced:
                replacement = self.replaced[replacement]
            node.replace_all_uses_with(replacement)
            self.gm.graph.erase_node(node)


TODO_HEAD = (
    "Only Linear, element-wise ops, Dropout, BatchNorm1d, LayerNorm, softmax, flatten/view and "
    "concatenation over features can follow the flatten. Apply this op to the score map "
    "yourself, after the converted model, or pass the module in leaf_modules if it lies in the "
    "feature extractor"
)

